"""Extra ``neat`` subcommands. ``neat NAME ...`` runs ``neat_lightning.commands.NAME.main(argv)`` (dashes in NAME
become underscores); fit/validate/test/predict go to LightningCLI."""


def doc_summary(doc: str) -> str:
    """A command module's first docstring paragraph as one line without reST backquotes: its ``--help`` summary."""
    return " ".join(doc.split("\n\n")[0].split()).replace("``", "")
