"""The tour notebook: executes end to end (small settings), and is committed without outputs."""
import json
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'prefix_sharing_tour.ipynb')
TIMEOUT_S = 600  # per cell; the whole notebook takes ~2-3 minutes on 2 CPU cores


def _kernel_manager(kernels_dir):
  """A kernel run by this interpreter (this venv), whatever kernelspecs the machine has."""
  from ipykernel.kernelspec import write_kernel_spec
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager
  write_kernel_spec(os.path.join(kernels_dir, 'python3'))  # argv: [sys.executable, ...]
  specs = KernelSpecManager(kernel_dirs=[kernels_dir], ensure_native_kernel=False)
  return KernelManager(kernel_name='python3', kernel_spec_manager=specs)


def test_notebook_executes_with_small_settings(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  pytest.importorskip('ipykernel')
  pytest.importorskip('matplotlib')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  monkeypatch.setenv('PREFIX_DPO_NOTEBOOK_SMALL', '1')
  monkeypatch.setenv('TMPDIR', str(tmp_path))  # the notebook's work directories (tempfile)
  monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
  km = _kernel_manager(str(tmp_path / 'kernels'))
  client = nbclient.NotebookClient(
      nb, km=km, timeout=TIMEOUT_S, kernel_name='python3',
      resources={'metadata': {'path': os.path.join(ROOT, 'notebooks')}})
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError (with the cell's traceback) on any error
  seconds = time.perf_counter() - start
  print(f'notebook executed in {seconds:.0f}s')

  assert km.kernel_spec.argv[0] == sys.executable
  outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 5, f'{len(images)} images'  # layouts, masks, blocks, training, benchmark
  assert 'backend: cpu' in text or 'backend: gpu' in text or 'backend: tpu' in text
  assert 'relative gradient difference' in text
  # Equivalence: every layout's log-probs equal paired to float32 precision.
  for line in text.splitlines():
    if 'vs paired: max |d log p|' in line:
      assert float(line.split('max |d log p|')[1].split()[0]) < 1e-3, line
  assert '"eval/loss"' in text  # the training run's final metrics
  markdown = ''.join(o['data'].get('text/markdown', '') for o in outputs
                     if o.output_type in ('display_data', 'execute_result'))
  assert 'ideal speedup' in markdown and '| file | unpacked |' in markdown


def test_committed_notebook_has_no_outputs():
  with open(NOTEBOOK, encoding='utf-8') as f:
    nb = json.load(f)
  dirty = [i for i, cell in enumerate(nb['cells']) if cell['cell_type'] == 'code'
           and (cell.get('outputs') or cell.get('execution_count') is not None)]
  assert not dirty, (f'{NOTEBOOK}: code cells {dirty} have outputs or execution counts; strip '
                     'them before committing (Edit > Clear all outputs, or jupyter nbconvert '
                     '--clear-output --inplace)')
  assert nb['metadata'].get('kernelspec', {}).get('name') == 'python3'
