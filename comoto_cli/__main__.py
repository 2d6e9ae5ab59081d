from comoto_cli.cli import main

main()
