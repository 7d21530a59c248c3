"""docs/architecture.md's worked examples run as written: a router, a dispatch and a merge
method, each added from outside the package with one registration."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def test_worked_examples_run():
    from jmoe.merge import MERGE_METHODS
    from jmoe.registry import DISPATCHERS, ROUTERS

    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
    finally:
        for table, name in ((ROUTERS, "temperature"), (DISPATCHERS, "every_expert"), (MERGE_METHODS, "halfway")):
            if name in table:
                table.remove(name)
    assert "temperature" not in ROUTERS
