from meshintercept.cli import main

main()
