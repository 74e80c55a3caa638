"""Extra ``neat`` subcommands. ``neat NAME ...`` runs ``neat_lightning.commands.NAME.main(argv)`` (dashes in NAME
become underscores); fit/validate/test/predict go to LightningCLI."""
