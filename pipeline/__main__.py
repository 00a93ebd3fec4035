from pipeline.cli import main

if __name__ == "__main__":  # vLLM spawns worker processes: the entry point must be guarded
    main()
