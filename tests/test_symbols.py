"""The Rust archive must not lend the firmware any C-library or runtime
symbol: the pre-linked engine object exports exactly the engine's C
functions, and the firmware's link map shows every other symbol defined
elsewhere."""

import sys
from pathlib import Path

from conftest import FIRMWARE, REPO

# The board builds' report reads link maps and symbol tables the same way.
sys.path.insert(0, str(REPO / "ports"))
from firmware_report import HEADER, LinkMap, engine_exports, global_definitions  # noqa: E402

ENGINE_OBJECT = FIRMWARE.parent / "mqtt_engine.o"
LINK_MAP = FIRMWARE.parent / "micropython.map"


def test_engine_object_exports_only_the_engine_functions():
    exports = engine_exports(HEADER)
    assert len(exports) > 10
    assert global_definitions(ENGINE_OBJECT) == exports


def test_firmware_takes_no_symbol_but_the_engine_functions_from_the_engine():
    definers = LinkMap(LINK_MAP).definers
    from_engine = {name for name, path in definers.items() if Path(path).name == "mqtt_engine.o"}
    assert from_engine == engine_exports(HEADER)
    # The C library functions the Rust runtime also carries come from libc or
    # libm (or, in the sanitizer build, from the sanitizer runtime that
    # intercepts them).
    for name in ("memcpy", "memmove", "memset", "memcmp", "sqrt", "fmod", "floor"):
        if name in definers:
            library = Path(definers[name]).name
            assert library.startswith(("libc.", "libm.", "libasan.")), (name, definers[name])
