"""pytest module placed next to the pinned peft release's unmodified test files (as
``test_hfcompress_methods.py`` in a package with them): swaps PEFT's row lists for ours
(benchmarks/peft_battery/rows.py) and exposes PEFT's test classes for collection."""

from . import test_custom_models as tcm  # noqa: F401  (the release's file, unmodified)
from . import testing_common  # noqa: F401
import rows

# PEFT's parametrize marks hold these list objects; replacing their contents in place before
# collection makes every check PEFT runs per built-in method run per method of ours instead.
tcm.TEST_CASES[:] = rows.TEST_CASES
tcm.ALL_PEFT_CONFIG_CLASSES[:] = rows.ALL_PEFT_CONFIG_CLASSES
tcm.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES[:] = rows.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES

TestPeftCustomModel = tcm.TestPeftCustomModel
TestMultipleActiveAdapters = tcm.TestMultipleActiveAdapters
TestRequiresGrad = tcm.TestRequiresGrad
