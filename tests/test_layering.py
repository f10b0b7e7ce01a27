"""The import arrows of DESIGN §2 point one way only; walk every module's imports (ast)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "stitch_lib": {"fleet_protocol", "fleet_controller", "device_agent", "simulators", "restnet",
                   "paho", "apscheduler", "yaml", "pydantic"},
    "fleet_protocol": {"fleet_controller", "device_agent", "simulators", "restnet", "torch",
                       "timm", "stitch_lib", "fleet_runtime", "paho"},
    "fleet_runtime": {"fleet_controller", "device_agent", "simulators", "restnet", "torch",
                      "timm", "stitch_lib"},
    "fleet_controller": {"device_agent", "simulators", "restnet"},
    "device_agent": {"fleet_controller", "simulators", "restnet"},
    "simulators": {"fleet_controller", "restnet"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    files = list((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    bad = {f"{f.relative_to(ROOT)} imports {sorted(imported_roots(f) & FORBIDDEN[package])}"
           for f in files if imported_roots(f) & FORBIDDEN[package]}
    assert not bad, bad


def test_the_walker_sees_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import paho.mqtt.client as m\nfrom yaml import safe_load\nfrom . import x\n")
    assert imported_roots(f) == {"paho", "yaml"}
