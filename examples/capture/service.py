#!/usr/bin/env python3
"""A small "service" that writes straight to its own SQLite database with plain SQL.

It knows nothing about jetsync: no client library, no NATS. Once `jetsync-applier capture
install` has put triggers on its tables, the applier running beside it publishes every
committed change, and every other instance applies it to its own database.

Two workloads:

* ``random`` (default): table ``items(id TEXT PRIMARY KEY, n INTEGER, s TEXT, f REAL)``.
  Each write picks one of ``--keys`` keys: an absent row is inserted, a present one is
  updated (70 %) or deleted (30 %). About ``--tx-fraction`` of the writes run inside
  multi-row transactions of 2 to 5 writes; the rest commit one by one.
* ``bank``: table ``accounts(id TEXT PRIMARY KEY, balance INTEGER NOT NULL)``. Each write is
  a transfer: one transaction moves money from one account to another, so the sum over all
  accounts never changes. ``--own FIRST:LAST`` limits the accounts this instance moves money
  between (capture is last-writer-wins per row, see README.md).

Writes take the write lock up front (``BEGIN IMMEDIATE``) and wait up to ``--busy-timeout``
seconds for it; a transaction that still fails with SQLITE_BUSY ("database is locked") is
rolled back and retried, so the service shares its file with the applier without errors.

Output (stdout, one JSON object per line): ``{"progress": <writes done>}`` every
``--progress-every`` writes, and at the end a summary::

    {"done": true, "writes": 5000, "changes": 5000, "transactions": 4100,
     "multi_row_transactions": 190, "writes_in_multi_row": 1660, "busy_retries": 3}

``changes`` counts the rows the service's statements changed in committed transactions
(rolled-back attempts and the rows the capture triggers write are not counted): with capture
installed, exactly that many changes are published.

Usage::

    service.py DB --init [--mode bank --accounts 100 --initial 1000 --create-accounts]
    service.py DB [--ops 5000] [--keys 500] [--tx-fraction 0.33] [--rate 500] [--seed 7]
    service.py DB --mode bank --ops 2000 --own 0:32 [--rate 200]
"""

import argparse
import json
import random
import sqlite3
import sys
import time

ITEMS_DDL = """CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    n  INTEGER,
    s  TEXT,
    f  REAL
)"""

ACCOUNTS_DDL = """CREATE TABLE IF NOT EXISTS accounts (
    id      TEXT PRIMARY KEY,
    balance INTEGER NOT NULL
)"""


def account_id(i):
    return "a%03d" % i


def connect(path, busy_timeout):
    # isolation_level=None: no implicit transactions, the service says BEGIN/COMMIT itself.
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def is_busy(error):
    text = str(error).lower()
    return "locked" in text or "busy" in text


class Stats:
    def __init__(self):
        self.writes = 0
        self.changes = 0
        self.transactions = 0
        self.multi = 0
        self.writes_in_multi = 0
        self.busy_retries = 0

    def summary(self):
        return {
            "done": True,
            "writes": self.writes,
            "changes": self.changes,
            "transactions": self.transactions,
            "multi_row_transactions": self.multi,
            "writes_in_multi_row": self.writes_in_multi,
            "busy_retries": self.busy_retries,
        }


def run_transaction(conn, stats, body):
    """Runs body(conn) -> rows changed in one IMMEDIATE transaction, retrying on SQLITE_BUSY.

    The rows changed (the sum of the statements' own row counts: not conn.total_changes,
    which also counts the rows the capture triggers write) are added to stats only once the
    commit succeeded.
    """
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            changed = body(conn)
            conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if not is_busy(e):
                raise
            stats.busy_retries += 1
            time.sleep(0.01)
            continue
        stats.changes += changed
        stats.transactions += 1
        return changed


def random_write(rng, keys):
    """One planned write of the random workload: (key, choice in [0, 1), new values)."""
    key = "k%04d" % rng.randrange(keys)
    letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(12)))
    return key, rng.random(), rng.randrange(-10**9, 10**9), letters, rng.uniform(-1e6, 1e6)


def apply_random_write(conn, write):
    key, choice, n, s, f = write
    exists = conn.execute("SELECT 1 FROM items WHERE id = ?", (key,)).fetchone() is not None
    if not exists:
        cursor = conn.execute("INSERT INTO items (id, n, s, f) VALUES (?, ?, ?, ?)", (key, n, s, f))
    elif choice < 0.7:
        cursor = conn.execute("UPDATE items SET n = ?, s = ? WHERE id = ?", (n, s, key))
    else:
        cursor = conn.execute("DELETE FROM items WHERE id = ?", (key,))
    return cursor.rowcount


def random_group_size(rng, tx_fraction):
    """1, or 2..5 with a probability chosen so that about tx_fraction of writes are in groups."""
    mean_group = 3.5
    if tx_fraction <= 0:
        return 1
    if tx_fraction >= 1:
        return rng.randint(2, 5)
    p = tx_fraction / (mean_group * (1 - tx_fraction) + tx_fraction)
    return rng.randint(2, 5) if rng.random() < p else 1


def transfer(rng, own):
    first, last = own
    a = rng.randint(first, last)
    b = rng.randint(first, last - 1)
    if b >= a:
        b += 1
    return account_id(a), account_id(b), rng.randint(1, 50)


def apply_transfer(conn, plan):
    source, target, amount = plan
    row = conn.execute("SELECT balance FROM accounts WHERE id = ?", (source,)).fetchone()
    if row is None or conn.execute("SELECT 1 FROM accounts WHERE id = ?", (target,)).fetchone() is None:
        return 0  # accounts not there (yet): nothing to move
    amount = min(amount, row[0])
    debit = conn.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, source))
    credit = conn.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, target))
    return debit.rowcount + credit.rowcount


def init(conn, args):
    conn.execute(ACCOUNTS_DDL if args.mode == "bank" else ITEMS_DDL)
    if args.mode == "bank" and args.create_accounts:
        stats = Stats()

        def create(c):
            changed = 0
            for i in range(args.accounts):
                changed += c.execute(
                    "INSERT INTO accounts (id, balance) VALUES (?, ?)",
                    (account_id(i), args.initial),
                ).rowcount
            return changed

        run_transaction(conn, stats, create)


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("db", help="the service's SQLite file")
    parser.add_argument("--mode", choices=["random", "bank"], default="random")
    parser.add_argument("--init", action="store_true", help="create the table and exit")
    parser.add_argument("--ops", type=int, default=5000, help="writes (bank: transfers)")
    parser.add_argument("--keys", type=int, default=500)
    parser.add_argument("--tx-fraction", type=float, default=1 / 3)
    parser.add_argument("--rate", type=float, default=0, help="writes per second, 0 = unpaced")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--busy-timeout", type=float, default=30.0)
    parser.add_argument("--progress-every", type=int, default=250)
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--initial", type=int, default=1000)
    parser.add_argument("--create-accounts", action="store_true")
    parser.add_argument("--own", default=None, help="FIRST:LAST account indexes (bank)")
    args = parser.parse_args()

    conn = connect(args.db, args.busy_timeout)
    if args.init:
        init(conn, args)
        emit({"done": True, "init": args.mode})
        return
    rng = random.Random(args.seed)
    stats = Stats()
    started = time.monotonic()
    next_progress = args.progress_every
    if args.mode == "bank":
        own = (0, args.accounts - 1)
        if args.own:
            first, last = args.own.split(":")
            own = (int(first), int(last))
    while stats.writes < args.ops:
        if args.rate > 0:
            due = started + stats.writes / args.rate
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        if args.mode == "bank":
            plan = transfer(rng, own)
            run_transaction(conn, stats, lambda c: apply_transfer(c, plan))
            stats.writes += 1
        else:
            size = min(random_group_size(rng, args.tx_fraction), args.ops - stats.writes)
            plans = [random_write(rng, args.keys) for _ in range(size)]

            def body(c):
                return sum(apply_random_write(c, plan) for plan in plans)

            run_transaction(conn, stats, body)
            stats.writes += size
            if size > 1:
                stats.multi += 1
                stats.writes_in_multi += size
        if stats.writes >= next_progress:
            emit({"progress": stats.writes})
            next_progress += args.progress_every
    emit(stats.summary())


if __name__ == "__main__":
    main()
