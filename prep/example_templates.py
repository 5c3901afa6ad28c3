"""Which template rendered each example, when the sources of a mixture use different templates.

A shard folder records its templates in `manifest.json`: `template` is the run's (`--template`), with its
`definition` (the template as data, so a custom file is not needed to read the shards back); when sources
use more than one template, `templates` lists each (`template`: the value given, `name`, `sha256`,
`definition`, `markers`), index 0 being the run's, and `example_templates.arrow` beside the shards says
which one each example used: one row per shard row (same order, over all shards), one int32 per example of
the row (an index into `templates`), in the layout of `seq_lengths`.

Why a file beside the shards and not a column in them: the training columns stay exactly the shard contract
(datasets, the HF Trainer and TRL see no extra column), and a run with one template writes nothing more.

>>> manifest_templates({"template": {"name": "chatml", "sha256": "..."}})[0].name
'chatml'
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from prep.contract import is_plain_name  # noqa: F401 (re-exported)
from prep.errors import ShardError

EXAMPLE_TEMPLATES_FILE = "example_templates.arrow"
COLUMN = "templates"


def write_example_templates(path: str | Path, groups: np.ndarray, order: np.ndarray, row_offsets: np.ndarray) -> dict:
    """Write the template index of every example, laid out like the rows of a plan, as an Arrow IPC stream.

    Args:
        path: the file to write.
        groups: template index per example, in store order.
        order, row_offsets: the plan (`PackPlan.order`, `PackPlan.row_offsets`): row r holds the examples
            order[row_offsets[r]:row_offsets[r + 1]].

    Returns:
        The manifest entry: {"file", "rows", "sha256"}.

    >>> import tempfile, os; p = os.path.join(tempfile.mkdtemp(), EXAMPLE_TEMPLATES_FILE)
    >>> write_example_templates(p, np.array([0, 1, 1]), np.array([2, 0, 1]), np.array([0, 2, 3]))["rows"]
    2
    """
    path = Path(path)
    values = pa.array(np.asarray(groups, dtype=np.int32)[np.asarray(order, dtype=np.int64)], type=pa.int32())
    offsets = pa.array(np.asarray(row_offsets, dtype=np.int32), type=pa.int32())
    table = pa.table({COLUMN: pa.ListArray.from_arrays(offsets, values)})
    with open(path, "wb") as f:
        with pa.ipc.new_stream(f, table.schema) as writer:
            writer.write_table(table)
    return {"file": path.name, "rows": table.num_rows, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def read_example_templates(folder: str | Path, manifest: dict[str, Any]) -> pa.ChunkedArray | None:
    """The per-row template indices of a shard folder (a list<int32> column), or None for a one-template run.

    Raises:
        ShardError: the manifest names the file but it is missing, unreadable or has another number of rows.

    >>> read_example_templates(".", {"template": {"name": "markers"}}) is None
    True
    """
    entry = manifest.get("example_templates")
    if not entry:
        return None
    name = entry.get("file")
    if not is_plain_name(name):
        raise ShardError(f"{Path(folder) / 'manifest.json'}: example_templates {name!r} is not a plain file name "
                         "inside the shard folder; refusing to read it")
    path = Path(folder) / name
    try:
        with pa.memory_map(str(path)) as source:
            column = pa.ipc.open_stream(source).read_all().column(COLUMN)
    except (OSError, pa.ArrowInvalid, KeyError) as e:
        raise ShardError(f"{path}: cannot read the example templates ({e}); run `prep verify {folder}`") from e
    rows = manifest.get("counts", {}).get("rows")
    if rows is not None and len(column) != rows:
        raise ShardError(f"{path}: {len(column)} rows, the shards have {rows}; run `prep verify {folder}`")
    return column


def manifest_templates(manifest: dict[str, Any]) -> list[Any]:
    """The Template of each entry of the manifest's `templates` (or of its one `template`); None where the
    template cannot be rebuilt (the tokenizer's chat template, or an old manifest naming a custom file).

    >>> [t.name for t in manifest_templates({"templates": [{"name": "markers"}, {"name": "chatml"}]})]
    ['markers', 'chatml']
    """
    from prep.render import BUILTIN_TEMPLATES, template_from_dict

    entries = manifest.get("templates") or [manifest.get("template") or {}]
    found = []
    for entry in entries:
        definition = entry.get("definition")
        if definition:
            found.append(template_from_dict(definition, source="manifest.json template"))
        else:
            found.append(BUILTIN_TEMPLATES.get(entry.get("name")))
    return found


def template_names(manifest: dict[str, Any]) -> list[str]:
    """A distinct label for each template the manifest lists (see `manifest_templates`), in index order: its
    name, or name and value given when two share a name (two files both named "custom").

    >>> template_names({"templates": [{"name": "qa", "template": "a/qa.toml"}, {"name": "qa", "template": "b.toml"}]})
    ['qa (a/qa.toml)', 'qa (b.toml)']
    """
    entries = manifest.get("templates") or [manifest.get("template") or {}]
    names = [str(entry.get("name", "?")) for entry in entries]
    return [f"{n} ({e.get('template')})" if names.count(n) > 1 else n for n, e in zip(names, entries)]
