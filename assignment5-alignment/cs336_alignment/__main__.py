from cs336_alignment.cli import main

main()
