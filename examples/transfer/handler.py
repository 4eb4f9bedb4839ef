"""Move an amount between two accounts with optimistic locking, retrying on conflict.

    nimbus deploy examples/transfer/handler.py --name transfer --state
    nimbus invoke transfer --data '{"open": {"a": 100, "b": 0}}'
    nimbus invoke transfer --data '{"from": "a", "to": "b", "amount": 30}'
    nimbus state get transfer _global

Each account is one key of the function's state. A transfer reads both with their versions
and writes each back only if nobody wrote it in between (`set_with_version`); on a
conflict it reads again and retries. The two writes are not one transaction: the debit is
written first, so a crash between them loses the credit, never creates money; a production
ledger would record the transfer itself first (an idempotent journal) and apply it after.
"""

import nimbus

RETRIES = 20


def _update(accounts, key, change):
    """Applies `change` to one account, retrying on conflicts; returns the new balance."""
    for _ in range(RETRIES):
        balance, version = accounts.get_with_version(key)
        if balance is None:
            raise ValueError("no account %r" % key)
        new = change(balance)
        try:
            accounts.set_with_version(key, new, version)
            return new
        except nimbus.StateConflict:
            continue  # somebody else wrote it: read again
    raise RuntimeError("account %r is too busy, try again" % key)


def handle(event, state):
    accounts = state.function()
    if "open" in event:
        for name, balance in event["open"].items():
            accounts.set(name, balance)
        return {name: accounts.get(name) for name in event["open"]}
    source, target, amount = event["from"], event["to"], event["amount"]
    if amount <= 0:
        raise ValueError("amount must be positive")

    def debit(balance):
        if balance < amount:
            raise ValueError("insufficient funds in %r: %s < %s" % (source, balance, amount))
        return balance - amount

    left = _update(accounts, source, debit)
    now = _update(accounts, target, lambda balance: balance + amount)
    return {source: left, target: now}
