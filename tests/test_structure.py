"""House size limits of the package: module <= 700 lines, class <= 450, function/method <= 80 (tools/structure.py)."""

import ast
import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_structure_tool():
    spec = importlib.util.spec_from_file_location("structure_tool", ROOT / "tools" / "structure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


structure = load_structure_tool()


def test_sizes_count_def_line_to_last_line_without_decorators_and_nested_ones_separately():
    source = textwrap.dedent(
        """\
        import functools


        @functools.cache
        @functools.wraps(print)
        def top(x):
            def inner(y):
                return y

            return inner(x)


        class Box:
            '''Doc.'''

            @property
            def size(self):
                return 1
        """
    )
    sizes = {name: (kind, lines) for kind, name, lines in structure.definition_sizes(ast.parse(source))}
    assert sizes == {
        "top": ("function", 5),
        "top.inner": ("function", 2),
        "Box": ("class", 6),
        "Box.size": ("function", 2),
    }


def test_offenders_reports_each_thing_over_its_limit_with_its_size(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    long_body = "\n".join(f"    x{i} = {i}" for i in range(80))
    (package / "sub" / "long.py").write_text(f"def long_one():\n{long_body}\n\n\ndef short():\n    return 1\n")
    (package / "big.py").write_text("\n".join(f"v{i} = {i}" for i in range(701)) + "\n")
    found = {str(offender) for offender in structure.offenders(package)}
    assert found == {
        "pkg/big.py (module): 701 lines > 700",
        "pkg/sub/long.py::long_one (function): 81 lines > 80",
    }


def test_package_is_within_the_house_size_limits():
    found = structure.offenders()
    listing = "\n".join(f"  {offender}" for offender in found)
    assert not found, f"{len(found)} over the house limits (module 700, class 450, function 80 lines):\n{listing}"


def test_readme_layout_table_lists_exactly_the_package_modules():
    """The README's layout section and the package agree: every module (and the diagnose package) has a row,
    and no row names a module that does not exist."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    package = ROOT / "kagglekd"
    modules = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    modules |= {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert rows == modules, f"missing rows: {sorted(modules - rows)}; rows without a module: {sorted(rows - modules)}"
