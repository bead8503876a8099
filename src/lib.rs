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
/// Were it ever reached, the engine ends the program the way the C library
/// does when a program cannot go on (`abort()`), without formatting the
/// message (core's formatting costs about 9 KB of flash): the port reports
/// it (ESP-IDF prints a backtrace and restarts the board, the unix port
/// dies of SIGABRT) instead of hanging silently.
#[cfg(not(any(test, feature = "std")))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    #[allow(unsafe_code)]
    unsafe extern "C" {
        fn abort() -> !;
    }
    // SAFETY: abort() takes no argument and never returns.
    #[allow(unsafe_code)]
    unsafe {
        abort()
    }
}
