"""One module per subcommand: parse flags into a validated config, then call the library."""
