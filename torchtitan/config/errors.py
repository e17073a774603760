"""The one exception type for user-facing configuration and input problems."""


class ConfigError(Exception):
    """A problem with the job's configuration or inputs.

    The message is a single line naming the key or path, the bad value and the fix; `main()` prints
    it without a traceback and exits with code 2.
    """
