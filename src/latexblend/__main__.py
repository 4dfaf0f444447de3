from latexblend.cli import main

main()
