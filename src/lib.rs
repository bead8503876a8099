//! The protocol engine of MicroPython's `mqtt` module: an MQTT 3.1.1 client
//! that knows nothing about Python.
//!
//! - [`codec`]: the wire format of every control packet.
//! - [`topic`]: topic name and filter rules, and matching.
//! - [`session`]: packet ids, in-flight messages, keepalive and timeouts,
//!   driven by the caller over `embedded_io` traits and a millisecond clock.
//! - `ffi`: the C interface used by `modmqtt.c` (the only `unsafe` code,
//!   but for one audited line in [`codec::utf8`]).
#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![deny(unsafe_code)]
// Tests may unwrap, panic, index and count freely; the library's own code
// is linted without these (clippy checks it in a build without cfg(test)).
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

pub mod codec;
pub mod session;
pub mod topic;

#[allow(unsafe_code)]
pub mod ffi;

/// The unix port links the archive with the host's C library; Rust's
/// prebuilt compiler_builtins references this symbol even though the
/// engine never unwinds (`panic = "abort"`).
#[cfg(all(not(test), not(feature = "std"), not(target_os = "none")))]
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

/// Unreachable by construction: clippy forbids the panicking constructs.
/// Were it ever reached, the engine stops on the processor's own trap
/// instruction, without formatting the message (core's formatting costs
/// about 9 KB of flash) and without pulling in the C library's abort()
/// (newlib's brings its signal code along): the port reports the fault
/// (ESP-IDF prints a backtrace and restarts the board, an Arm board's
/// HardFault handler runs, the unix port dies of SIGILL) instead of the
/// board hanging silently.
#[cfg(not(any(test, feature = "std")))]
#[panic_handler]
#[allow(unsafe_code)]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: each instruction only raises the processor's illegal
    // instruction fault; it reads and writes no memory.
    unsafe {
        #[cfg(target_arch = "arm")]
        core::arch::asm!("udf #0", options(noreturn));
        #[cfg(any(target_arch = "riscv32", target_arch = "riscv64"))]
        core::arch::asm!("unimp", options(noreturn));
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        core::arch::asm!("ud2", options(noreturn));
    }
    // Other processors (Xtensa's instruction is not in stable Rust).
    #[allow(unreachable_code)]
    loop {}
}
