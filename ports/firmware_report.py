#!/usr/bin/env python3
"""What the `mqtt` module costs a firmware, and proof that it lends the
firmware nothing else.

    ports/firmware_report.py LABEL=MAPFILE [LABEL=MAPFILE ...]

Each MAPFILE is the GNU ld map of a firmware linked with the module: rp2's
`firmware.elf.map`, the unix port's `micropython.map`, the qemu port's map.
For each firmware it prints one row: the flash bytes (.text* and .rodata*
input sections) linked from the engine object (the pre-linked Rust engine,
`mqtt_engine.o`) and from the binding (modmqtt.c's object), and their total.

It also checks that the firmware takes no symbol from the engine but the
engine's exported functions (the `mqtt_*(` names of mqtt_engine.h): the Rust
archive carries compiler_builtins, whose memcpy, memmove, __aeabi_* and
soft-float routines must never replace the firmware's own. On rp2, memmove
and memcmp must also still come from the C library or the pico-sdk, and on
the RP2040 sit in RAM, where the port's linker script places them. And the
engine object must not need atomic routines (`__atomic_*`, `__sync_*`), which
the RP2040's Cortex-M0+ cannot back with instructions. Any violation is printed and the script exits with status 1. Beside each
thumbv6m row it prints the goal: engine and binding under 12 KiB.
"""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEADER = REPO / "mqtt_engine.h"

# The size we aim for on the RP2040 (Cortex-M0+, Rust target thumbv6m-none-eabi).
THUMBV6M_GOAL = 12 * 1024

# Names a C library or compiler runtime defines, which the Rust archive also
# carries: reported by name when they come from the engine.
RUNTIME_NAME = re.compile(
    r"^(mem(cpy|move|set|cmp)|str\w+|__aeabi_\w+|__\w+[sdt]f\d?|"
    r"(sqrt|fmod|floor|ceil|log2|log10|exp|pow|trunc|round)f?)$"
)

# Output sections that hold no bytes of the image.
NOT_LOADED = {"/DISCARD/", ".bss", ".heap", ".stack", ".stack_dummy"}


def engine_exports(header):
    return set(re.findall(r"\b(mqtt_\w+)\(", header.read_text()))


def is_engine(path):
    """The pre-linked engine object, or a member of the raw Rust archive."""
    name = Path(path.split("(", 1)[0]).name
    return name.startswith("mqtt_engine") and name.endswith(".o") or name == "libmqtt_engine.a"


def is_shim(path):
    return Path(path).name in ("modmqtt.o", "modmqtt.c.o", "modmqtt.c.obj")


class LinkMap:
    """The parts of a GNU ld map this report needs.

    sections: (output section, input section, address, size, file) per
    input section placed in the image.
    symbols: name -> (address, file, output section) for each global symbol
    the memory map lists.
    definers: name -> file defining it, from the cross reference table
    (empty when the firmware was linked without --cref).
    regions: memory region name -> (origin, length).
    """

    def __init__(self, path):
        self.path = Path(path)
        text = self.path.read_text(errors="replace")
        memory_map, _, cross_reference = text.partition("\nCross Reference Table")
        head, _, memory_map = memory_map.partition("\nLinker script and memory map")
        self.regions = self._regions(head)
        self.sections = []
        self.symbols = {}
        self._read_memory_map(memory_map)
        self.definers = self._read_cross_reference(cross_reference)
        self.arch = self._arch(text)

    @staticmethod
    def _regions(head):
        regions = {}
        config = head.partition("Memory Configuration")[2]
        for line in config.splitlines():
            match = re.match(r"^(\S+)\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)", line)
            if match and match.group(1) != "*default*":
                regions[match.group(1)] = (int(match.group(2), 16), int(match.group(3), 16))
        return regions

    def _read_memory_map(self, memory_map):
        output = None
        current = None  # the input section the symbol lines below belong to
        pending = None  # an input section name whose address is on the next line
        for line in memory_map.splitlines():
            if not line.strip():
                continue
            if not line[0].isspace():
                output = line.split()[0]
                current = pending = None
                continue
            fields = line.split()
            if pending is not None:
                name, pending = pending, None
                if len(fields) == 3 and fields[0].startswith("0x"):
                    current = self._add_section(output, name, fields)
                    continue
            if line.startswith(" ") and not line.startswith("  ") and not fields[0].startswith("*"):
                # " .text.name  0xADDR  0xSIZE  file", or the name alone when long.
                if len(fields) == 1:
                    pending = fields[0]
                    current = None
                elif len(fields) >= 4 and fields[1].startswith("0x"):
                    current = self._add_section(output, fields[0], fields[1:])
                else:
                    current = None
                continue
            # "                0xADDR                symbol"
            if len(fields) == 2 and fields[0].startswith("0x") and re.match(r"^[\w.$]+$", fields[1]):
                if current is not None:
                    self.symbols[fields[1]] = (int(fields[0], 16), current[4], output)

    def _add_section(self, output, name, fields):
        address, size, path = int(fields[0], 16), int(fields[1], 16), " ".join(fields[2:])
        section = (output, name, address, size, path)
        if output not in NOT_LOADED:
            self.sections.append(section)
        return section

    @staticmethod
    def _read_cross_reference(cross_reference):
        definers = {}
        name = None
        for line in cross_reference.splitlines()[1:]:
            fields = line.split()
            if not fields or fields == ["Symbol", "File"]:
                continue
            if not line[0].isspace():
                # The first file named for a symbol defines it.
                name = fields[0]
                if len(fields) > 1:
                    definers[name] = " ".join(fields[1:])
                    name = None
            elif name is not None:
                definers[name] = " ".join(fields)
                name = None
        return definers

    @staticmethod
    def _arch(text):
        """The instruction set, from the multilib folder of the C libraries linked."""
        match = re.search(r"/thumb/(v[\w.-]+)[+/]", text)
        if match:
            return "thumb" + match.group(1).replace("-", "")
        match = re.search(r"/(rv32[a-z]+)/ilp32", text)
        if match:
            return match.group(1)
        if "x86_64" in text:
            return "x86_64"
        return "?"

    def flash_bytes(self, belongs):
        return sum(size for _, name, _, size, path in self.sections
                   if belongs(path) and name.startswith((".text", ".rodata")))

    def resolve(self, path):
        """A file named in the map, relative to the folder the linker ran in."""
        candidate = Path(path)
        if candidate.is_absolute():
            return candidate
        for base in (self.path.parent, self.path.parent.parent):
            if (base / candidate).exists():
                return base / candidate
        return candidate

    def region_of(self, address):
        for name, (origin, length) in self.regions.items():
            if origin <= address < origin + length:
                return name
        return None


def global_definitions(object_path):
    """Global and weak symbols an object defines (readelf: binutils nm cannot
    read rustc's objects)."""
    listing = subprocess.run(["readelf", "-sW", str(object_path)], check=True,
                             capture_output=True, text=True).stdout
    names = set()
    for line in listing.splitlines():
        fields = line.split()
        # Num: Value Size Type Bind Vis Ndx Name
        if len(fields) == 8 and fields[4] in ("GLOBAL", "WEAK") and fields[6] != "UND":
            names.add(fields[7])
    return names


def undefined_symbols(object_path):
    """The symbols an object needs from elsewhere."""
    listing = subprocess.run(["readelf", "-sW", str(object_path)], check=True,
                             capture_output=True, text=True).stdout
    return {fields[7] for fields in map(str.split, listing.splitlines())
            if len(fields) == 8 and fields[6] == "UND"}


def check(link_map, exports):
    """The violations found in one firmware's map, as sentences."""
    problems = []
    engine_files = {path for _, _, _, _, path in link_map.sections if is_engine(path)}
    if not engine_files:
        return ["no engine object (mqtt_engine.o) is linked: is this a firmware with the module?"]
    if not any(is_shim(path) for _, _, _, _, path in link_map.sections):
        problems.append("no object of modmqtt.c is linked")

    # What the linker took from the engine, by the memory map and the cross
    # reference table.
    taken = {name for name, (_, path, _) in link_map.symbols.items() if is_engine(path)}
    taken |= {name for name, path in link_map.definers.items() if is_engine(path)}
    for name in sorted(taken - exports):
        kind = "C library or runtime symbol" if RUNTIME_NAME.match(name) else "symbol"
        problems.append(f"{kind} {name} is taken from the engine ({link_map.definers.get(name) or link_map.symbols[name][1]})")

    # The map lists global symbols only; the object's own symbol table shows
    # whether anything else could be lent (a weak memcpy, say).
    for path in sorted(engine_files):
        if "(" in path:
            problems.append(f"the raw Rust archive is linked ({path}); link the pre-linked engine object instead")
            continue
        object_path = link_map.resolve(path)
        if not object_path.exists():
            problems.append(f"cannot read {path} to check its symbol table")
            continue
        extra = global_definitions(object_path) - exports
        if extra:
            problems.append(f"{path} defines global symbols other than the engine's functions: {', '.join(sorted(extra))}")
        # Atomic operations the instruction set lacks (thumbv6m has no
        # compare-and-swap) become calls to such routines.
        atomics = sorted(name for name in undefined_symbols(object_path) if name.startswith(("__atomic_", "__sync_")))
        if atomics:
            problems.append(f"{path} needs atomic routines: {', '.join(atomics)}")

    # On rp2 they must be the C library's; on the RP2040 the port's linker
    # script places them in RAM, and a flash copy from the archive would be
    # slower than what the plain image has.
    for name, (address, path, output) in rp2_memory_functions(link_map).items():
        library = Path(path.split("(", 1)[0]).name
        if not (library.startswith(("libc", "libg.", "libm.", "libgcc.")) or "pico-sdk" in path):
            problems.append(f"{name} comes from {path}, not from the C library or the pico-sdk")
        if link_map.arch == "thumbv6m" and link_map.region_of(address) != "RAM":
            problems.append(f"{name} is at 0x{address:08x} in {output} ({link_map.region_of(address)}), not in RAM")
    return problems


def rp2_memory_functions(link_map):
    """memmove and memcmp as the firmware links them, when it is an rp2 image."""
    if not {"FLASH", "RAM", "SCRATCH_X"} <= set(link_map.regions):
        return {}
    return {name: link_map.symbols[name] for name in ("memmove", "memcmp") if name in link_map.symbols}


def main(arguments):
    if not arguments or any("=" not in argument for argument in arguments):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    exports = engine_exports(HEADER)
    print(f"{'firmware':<22} {'arch':<14} {'engine':>8} {'binding':>8} {'total':>8}  (.text + .rodata bytes)")
    failures = []
    for argument in arguments:
        label, map_file = argument.split("=", 1)
        link_map = LinkMap(map_file)
        engine = link_map.flash_bytes(is_engine)
        shim = link_map.flash_bytes(is_shim)
        total = engine + shim
        goal = ""
        if link_map.arch == "thumbv6m" and engine:
            verdict = "met" if total < THUMBV6M_GOAL else "NOT met"
            goal = f"  goal < {THUMBV6M_GOAL:,} B: {verdict}"
        print(f"{label:<22} {link_map.arch:<14} {engine:>8,} {shim:>8,} {total:>8,}{goal}")
        for name, (address, path, output) in rp2_memory_functions(link_map).items():
            region = link_map.region_of(address)
            print(f"{'':<22} {name} from {Path(path).name}, at 0x{address:08x} in {output} ({region})")
        failures += [f"{label}: {problem}" for problem in check(link_map, exports)]
    if failures:
        print("\nThe engine lends the firmware symbols it must not, or cannot be checked:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    print(f"\nOnly the engine's {len(exports)} exported functions come from the engine object in each firmware,")
    print("and no engine object needs an atomic operation its target lacks.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
