"""mqtt.pyi, the type stub, describes the module the firmware has: the same
public names in `mqtt` and in `mqtt.Client`, the same constant values."""

import ast
import json

import pytest

from conftest import REPO

STUB = REPO / "mqtt.pyi"


def public(names):
    return {name for name in names if not name.startswith("_")}


def stub_tree():
    return ast.parse(STUB.read_text(), filename=str(STUB))


def stub_module_names(tree):
    """Names the stub defines at module level (imports excluded)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets)
    return public(names)


def stub_class(tree, name):
    return next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name)


def stub_constants(tree):
    """Module-level constants the stub gives a value: name -> value."""
    return {
        node.target.id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.AnnAssign) and node.value is not None
    }


def stub_loop_values(tree):
    """The str values LOOP may have: the arguments of its Literal[...]."""
    annotation = next(
        node.annotation for node in tree.body if isinstance(node, ast.AnnAssign) and node.target.id == "LOOP"
    )
    literals = [node for node in ast.walk(annotation) if isinstance(node, ast.Subscript)]
    literal = next(node for node in literals if isinstance(node.value, ast.Name) and node.value.id == "Literal")
    return set(ast.literal_eval(literal.slice))


@pytest.fixture
def firmware_api(micropython):
    """The firmware's public names and the values of its constants."""
    output = micropython.run(
        """
        import json
        names = [name for name in dir(mqtt) if not name.startswith("_")]
        values = {}
        for name in names:
            value = getattr(mqtt, name)
            if isinstance(value, (int, str)):
                values[name] = value
        print(json.dumps({"module": names, "client": dir(mqtt.Client), "values": values}))
        """
    )
    return json.loads(output.strip().splitlines()[-1])


def test_stub_passes_mypy_strict(tmp_path):
    # mypy is one of the tests' packages (ports/setup.sh): never skipped.
    import mypy.api

    report, errors, status = mypy.api.run(["--strict", "--cache-dir", str(tmp_path), str(STUB)])
    assert status == 0, report + errors


def test_module_names_agree(firmware_api):
    assert stub_module_names(stub_tree()) == set(firmware_api["module"])


def test_client_names_agree(firmware_api):
    client = stub_class(stub_tree(), "Client")
    stub_names = public(node.name for node in client.body if isinstance(node, ast.FunctionDef))
    assert stub_names == public(firmware_api["client"])


def test_constants_agree(firmware_api):
    tree = stub_tree()
    firmware_values = dict(firmware_api["values"])
    assert firmware_values.pop("LOOP") in stub_loop_values(tree)
    assert stub_constants(tree) == firmware_values
