from expertrag.cli import main

main()
