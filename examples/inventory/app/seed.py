"""Seed the inventory database: items with stock, a history of orders, summary tables."""

import random
import sqlite3
import sys

ROWS = int(sys.argv[2]) if len(sys.argv) > 2 else 40_000

db = sqlite3.connect(sys.argv[1])
db.executescript("""
    CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, stock INTEGER NOT NULL);
    CREATE TABLE orders (id INTEGER PRIMARY KEY, item INTEGER REFERENCES items(id),
                         qty INTEGER NOT NULL);
""")
rng = random.Random(7)
db.executemany("INSERT INTO items VALUES (?, ?, ?)",
               ((n, f"item-{n:06d}", rng.randrange(1, 500)) for n in range(1, ROWS + 1)))
for _ in range(ROWS * 4):  # one statement each: the slow part, like a real import
    db.execute("INSERT INTO orders (item, qty) VALUES (?, ?)",
               (rng.randrange(1, ROWS + 1), rng.randrange(1, 5)))
db.executescript("""
    CREATE INDEX orders_item ON orders(item);
    CREATE TABLE sold AS SELECT item, SUM(qty) AS qty FROM orders GROUP BY item;
""")
db.commit()
print(db.execute("SELECT COUNT(*) FROM items").fetchone()[0], "items seeded")
