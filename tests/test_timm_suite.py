"""timm's own model tests (tests/test_models.py of the installed timm version's source) on
convmlp_s, through tools/run_timm_tests.py."""
import os
import os.path as osp
import re
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def test_timms_model_tests_pass_on_convmlp_s():
    result = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools', 'run_timm_tests.py'), '--models', 'convmlp_s',
         '--', '-rA'],
        capture_output=True, text=True, timeout=1200,
        env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, (result.stdout[-4000:], result.stderr[-2000:])
    passed = set(re.findall(r'PASSED \S*::(test_\w+)\[[^\]]*convmlp_s', result.stdout))
    assert {'test_model_forward', 'test_model_backward', 'test_model_default_cfgs',
            'test_model_forward_features', 'test_model_forward_torchscript',
            'test_model_forward_fx', 'test_model_backward_fx',
            'test_model_forward_fx_torchscript'} <= passed, result.stdout[-4000:]
    assert not re.search(r'\b(failed|error)', result.stdout.strip().splitlines()[-1])
