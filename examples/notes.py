"""A note book on the command line whose data are shared objects in a heap file: every command
that changes several things is one transaction, so even ``kill -9`` never leaves half of one.

    python3 examples/notes.py FILE add "buy milk" --tag home --tag today
    python3 examples/notes.py FILE list [--all]      (open notes; --all: done ones too)
    python3 examples/notes.py FILE tag home          (notes with that tag)
    python3 examples/notes.py FILE done 1
    python3 examples/notes.py FILE stats             (counts, then a consistency check)
    python3 examples/notes.py FILE stress            (adds notes until stopped: try kill -9)

In the heap's root dict: ``notes`` maps a number to ``{"text", "tags", "done"}``, ``tags`` maps
a tag to the list of its notes' numbers, ``next`` is the next number and ``open`` counts the
open notes. ``add`` changes all four in one ``with h.transaction():``; after a crash, the next
process to open the file undoes a transaction left half done (``stats`` shows how many times
that happened: ``recoveries``). ``stats`` also checks that the four agree, and ``h.check()``
the heap; it exits 1 if not.
"""

import argparse
import itertools
import sys

import pheap


def tables(h: pheap.Heap):
    root = h.root
    if "open" not in root:  # a new file: each setdefault is atomic, whoever comes first
        for key, empty in (("notes", {}), ("tags", {}), ("next", 1), ("open", 0)):
            root.setdefault(key, empty)
    return root, root["notes"], root["tags"]


def add(h: pheap.Heap, text: str, tags: list[str]) -> int:
    root, notes, by_tag = tables(h)
    for attempt in itertools.count():
        try:
            with h.transaction():  # all of it or none of it, even if this process dies inside
                n = root["next"]
                notes[n] = {"text": text, "tags": tags, "done": False}
                for t in tags:
                    by_tag.setdefault(t, []).append(n)
                root["next"] = n + 1
                root["open"] += 1
            return n
        except pheap.TransactionTooLargeError:  # its undo log overflowed: rolled back, and
            if attempt == 7:                      # the next one gets a log twice the size
                raise


def show(n: int, note) -> None:
    tags = "".join(f" #{t}" for t in note["tags"])
    print(f"{n:4} [{'x' if note['done'] else ' '}] {note['text']}{tags}")


def stats(h: pheap.Heap) -> int:
    root, notes, by_tag = tables(h)
    with h.lock():  # a consistent picture: no writer in between
        items = [(n, note["done"], list(note["tags"])) for n, note in notes.items()]
        index = {t: list(ns) for t, ns in by_tag.items()}
        nxt, open_ = root["next"], root["open"]
    undone = sum(not done for _, done, _ in items)
    print(f"{len(items)} notes, {undone} open, {len(items) - undone} done, {len(index)} tags; "
          f"heap: {h.stats().used_blocks} allocations, {h.info()['recoveries']} recoveries")
    want = {t: [n for n, _, tags in items if t in tags] for t in index}
    bad = [what for ok, what in [
        ([n for n, _, _ in items] == list(range(1, nxt)), "note numbers 1..next-1"),
        (undone == open_, f"open count {open_}"), (index == want, "the tag index")] if not ok]
    h.check()
    print(f"consistent: {'ok' if not bad else 'NO: ' + ', '.join(bad)}; heap check: ok")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("add").add_argument("text")
    sub.choices["add"].add_argument("--tag", action="append", default=[])
    sub.add_parser("list").add_argument("--all", action="store_true")
    sub.add_parser("tag").add_argument("name")
    sub.add_parser("done").add_argument("number", type=int)
    sub.add_parser("stats")
    sub.add_parser("stress")
    args = ap.parse_args()
    h = pheap.open(args.file, "c")
    root, notes, by_tag = tables(h)
    if args.cmd == "add":
        print(f"added note {add(h, args.text, args.tag)}")
    elif args.cmd == "list":
        for n, note in notes.items():
            if args.all or not note["done"]:
                show(n, note)
    elif args.cmd == "tag":
        for n in by_tag.get(args.name, []):
            show(n, notes[n])
    elif args.cmd == "done":
        with h.transaction():
            note = notes.get(args.number)
            if note is None:
                sys.exit(f"no note {args.number}")
            if not note["done"]:
                note["done"] = True
                root["open"] -= 1
        show(args.number, note)
    elif args.cmd == "stats":
        return stats(h)
    elif args.cmd == "stress":
        end = "\r" if sys.stdout.isatty() else "\n"
        try:
            for i in itertools.count(root["next"]):  # forever
                n = add(h, f"stress note {i} " + "x" * (i % 300), ["stress", f"batch{i // 100}"])
                print(f"committed note {n}", end=end, flush=True)
        except KeyboardInterrupt:
            print("\nstopped; the note being added, if any, was rolled back")
    return 0


if __name__ == "__main__":
    sys.exit(main())
