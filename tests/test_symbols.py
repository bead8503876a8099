"""The Rust archive must not lend the firmware any C-library or runtime
symbol: the pre-linked engine object exports exactly the engine's C
functions, and the firmware's link map shows every other symbol defined
elsewhere."""

import re
import subprocess
from pathlib import Path

from conftest import FIRMWARE, REPO

ENGINE_OBJECT = FIRMWARE.parent / "mqtt_engine.o"
LINK_MAP = FIRMWARE.parent / "micropython.map"


def header_exports():
    header = (REPO / "mqtt_engine.h").read_text()
    return set(re.findall(r"\b(mqtt_\w+)\(", header))


def global_definitions(path):
    listing = subprocess.run(["readelf", "-sW", str(path)], check=True, capture_output=True, text=True).stdout
    names = set()
    for line in listing.splitlines():
        fields = line.split()
        # Num: Value Size Type Bind Vis Ndx Name
        if len(fields) == 8 and fields[4] in ("GLOBAL", "WEAK") and fields[6] != "UND":
            names.add(fields[7])
    return names


def cross_reference_definers(map_text):
    """Symbol -> defining file, from the map's cross reference table."""
    table = map_text.split("Cross Reference Table", 1)[1]
    definers = {}
    for line in table.splitlines():
        match = re.match(r"^(\S+)\s+(\S+)$", line)
        if match and match.group(1) != "Symbol":
            definers[match.group(1)] = match.group(2)
    return definers


def test_engine_object_exports_only_the_engine_functions():
    exports = header_exports()
    assert len(exports) > 10
    assert global_definitions(ENGINE_OBJECT) == exports


def test_firmware_takes_no_symbol_but_the_engine_functions_from_the_engine():
    definers = cross_reference_definers(LINK_MAP.read_text())
    from_engine = {name for name, path in definers.items() if Path(path).name == "mqtt_engine.o"}
    assert from_engine == header_exports()
    # The C library functions the Rust runtime also carries come from libc or
    # libm (or, in the sanitizer build, from the sanitizer runtime that
    # intercepts them).
    for name in ("memcpy", "memmove", "memset", "memcmp", "sqrt", "fmod", "floor"):
        if name in definers:
            library = Path(definers[name]).name
            assert library.startswith(("libc.", "libm.", "libasan.")), (name, definers[name])
