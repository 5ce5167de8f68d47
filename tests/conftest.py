import os
import tempfile

# The built-in dataset is generated into a cache; keep the tests' copy away from the user's.
os.environ.setdefault("NL_DETECTRON_CACHE", os.path.join(tempfile.gettempdir(), "nl_detectron_test_cache"))
