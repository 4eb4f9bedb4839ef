"""A counter shared by every invocation of the function, whatever the session.

    nimbus deploy examples/counter/handler.py --name counter --state
    nimbus invoke counter                     # {"count": 1}
    nimbus invoke counter --data '{"by": 5}'  # {"count": 6}
    nimbus state get counter _global

`incr` is atomic on the platform: concurrent invocations never lose a count.
"""


def handle(event, state):
    by = event.get("by", 1) if isinstance(event, dict) else 1
    return {"count": state.function().incr("count", by)}
