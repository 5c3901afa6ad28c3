"""How many encoding workers one `prep pack` main process can keep busy: the reason for `--workers` auto's cap.

Usage: python benchmarks/workers.py [--records 20000] [--repeats 5] [--template markers|chatml|tokenizer]
                                   [--tokenizer ../shared/data/tokenizers/gpt2-dialogpt-small]

With `--workers N`, the main process reads and converts every record, sends batches out, and spills every
encoded batch that comes back (plus rejects and counts); the N workers render, tokenize and label. Both sides
are timed here in one process, one CPU each (TOKENIZERS_PARALLELISM=false, as in the workers), on the real
Alpaca-style data in ../shared/data written as unified JSONL:
- main: `iter_conversations` over the file, pickling each batch of conversations for a worker, unpickling the
  EncodeResult that comes back, and `ExampleStore.append` of its table, seconds per record;
- worker: unpickling the batch, `Encoder.encode` (`--template`), pickling the result, seconds per record;
- their ratio: the number of workers that one main process can feed before it becomes the bottleneck.
Printed as medians of `--repeats` runs; also the resident memory a worker adds (USS of a forked worker after
encoding, from /proc/self/smaps_rollup).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one CPU per side, as in the workers
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
SHARED = ROOT.parent / "shared" / "data"


def _uss_mib() -> float:
    """Unique set size of this process (private pages), MiB."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0])
    return (fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)) / 1024


def main() -> None:
    from pack import unified_lines, write_input

    from prep.convert import iter_conversations
    from prep.encode import Encoder
    from prep.render import load_template
    from prep.spill import ExampleStore
    from prep.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "gpt2-dialogpt-small"))
    parser.add_argument("--template", default="markers")
    args = parser.parse_args()

    tok = load_tokenizer(args.tokenizer)
    encoder = Encoder(tok, load_template(args.template, tok), train_on="completion", max_len=2048, overflow="split")
    main_s, worker_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unified.jsonl"
        write_input(unified_lines(), args.records, path)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            conversations = [c for c in iter_conversations([str(path)]) if c.__class__.__name__ == "Conversation"]
            read = time.perf_counter() - t0
            sent, results, encode, send = [], [], 0.0, 0.0
            for start in range(0, len(conversations), args.batch_size):
                t0 = time.perf_counter()
                sent.append(pickle.dumps(conversations[start : start + args.batch_size]))
                send += time.perf_counter() - t0
                t0 = time.perf_counter()
                results.append(pickle.dumps(encoder.encode(pickle.loads(sent[-1]))))
                encode += time.perf_counter() - t0
            t0 = time.perf_counter()
            with ExampleStore(parent=tmp) as store:
                for result in results:
                    store.append(pickle.loads(result).table)
            spill = time.perf_counter() - t0
            main_s.append((read + send + spill) / len(conversations))
            worker_s.append(encode / len(conversations))
        uss = _worker_uss(encoder, conversations[: args.batch_size])
    m, w = statistics.median(main_s), statistics.median(worker_s)
    print(json.dumps({
        "records": len(conversations), "tokenizer": Path(args.tokenizer).name, "template": args.template,
        "repeats": args.repeats,
        "main_us_per_record": round(m * 1e6, 1), "worker_us_per_record": round(w * 1e6, 1),
        "workers_one_main_process_can_feed": round(w / m, 2), "worker_uss_mib": round(uss, 1),
        "cpus": len(os.sched_getaffinity(0)),
    }))


def _worker_uss(encoder, batch) -> float:
    """Private memory (MiB) of a forked child after it encodes one batch: what each worker adds."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        encoder.encode(batch)
        os.write(write_fd, f"{_uss_mib():.3f}".encode())
        os._exit(0)
    os.close(write_fd)
    value = float(os.read(read_fd, 64).decode())
    os.waitpid(pid, 0)
    return value


if __name__ == "__main__":
    main()
