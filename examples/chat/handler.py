"""A chat history per session that forgets conversations idle for ten minutes.

    nimbus deploy examples/chat/handler.py --name chat --state
    nimbus invoke chat --session room-1 --data '{"user": "ann", "text": "hi"}'
    nimbus invoke chat --session room-1 --data '{"user": "bob", "text": "hello"}'
    nimbus state get chat room-1    # "history" with its TTL counting down from 600 s

Every message writes the history again with a fresh TTL, so only idle rooms expire. The
history keeps the last 50 messages (a value is at most max_state_size, 64 KiB by default).
"""

KEEP = 50
IDLE_TTL = 600  # seconds


def handle(event, state):
    history = state.get("history") or []
    if event.get("text"):
        history.append({"user": event.get("user", "anonymous"), "text": event["text"]})
        history = history[-KEEP:]
        state.set("history", history, ttl=IDLE_TTL)
    return {"messages": len(history), "last": history[-5:]}
