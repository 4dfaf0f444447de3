"""The one exception type that reaches users as a single line (see ``cli.main``)."""


class LatexBlendError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints ``error: <message>`` and exits with :attr:`exit_code`; library users catch it.
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
