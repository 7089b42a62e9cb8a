import faulthandler, os, runpy, sys
faulthandler.dump_traceback_later(float(os.environ.get("DIAG_DUMP_S", "60")), exit=True)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
