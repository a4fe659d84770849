"""Writes tests/data/tiny: a small dataset whose right answer is known.

40 items with two- or three-word titles; 30 users, each walking the chain of items
``s, s+1, s+2, ...`` (wrapping after item 40) with increasing timestamps. The next item is always
the successor of the last one, so a model that reads item texts can learn it exactly.
"""

from pathlib import Path

COLORS = ["red", "blue", "green", "amber", "violet", "black", "white", "silver"]
THINGS = ["lamp", "chair", "kettle", "clock", "bottle"]
NUM_ITEMS, NUM_USERS = 40, 30


def main(folder=Path(__file__).parent / "tiny"):
    folder.mkdir(exist_ok=True)
    with open(folder / "tiny.item", "w") as item_file:
        item_file.write("item_id:token\ttitle:token_seq\tbrand:token\n")
        for item in range(1, NUM_ITEMS + 1):
            color, thing = COLORS[item % len(COLORS)], THINGS[(item // len(COLORS)) % len(THINGS)]
            extra = " deluxe" if item % 3 == 0 else ""
            item_file.write(f"{item}\t{color} {thing}{extra}\tbrand{item % 4}\n")
    with open(folder / "tiny.inter", "w") as inter_file:
        inter_file.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user in range(1, NUM_USERS + 1):
            start, length = (user * 7) % NUM_ITEMS, 8 + user % 7
            for step in range(length):
                item = (start + step) % NUM_ITEMS + 1
                inter_file.write(f"u{user}\t{item}\t{1000 * user + step}\n")


if __name__ == "__main__":
    main()
