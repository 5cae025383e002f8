from doodl3_cli.cli import main

main()
