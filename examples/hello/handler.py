"""The example function deployed by `nimbus server --example`."""

import platform

GREETING = "Hello"  # module-level init runs once per instance, not per call


def handle(event):
    name = event.get("name", "world") if isinstance(event, dict) else "world"
    return {"message": f"{GREETING}, {name}!", "python": platform.python_version()}
