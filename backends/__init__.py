"""Built-in interception backends (installed as ``meshintercept.backends``).

The core finds them through the ``meshintercept.backends`` entry-point group only.
"""
