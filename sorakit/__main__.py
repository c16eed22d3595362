from sorakit.cli.main import main

main()
