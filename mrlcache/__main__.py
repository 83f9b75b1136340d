from mrlcache.cli import main

main()
