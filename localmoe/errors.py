"""The one exception type users of the Python API catch."""


class LocalMoEError(Exception):
    """A problem with the user's input or environment: a bad or unsupported model file, a bad
    option, a prompt that does not fit the context. The message is one line that says what is
    wrong and what to do; the CLI prints it as ``error: <message>`` and exits with code 2."""
