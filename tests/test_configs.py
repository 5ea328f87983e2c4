"""Every shipped config loads and validates; a real-model config trains a local HF model."""
import glob
import importlib.util
import json
import os

import pytest

from prefix_dpo import config as config_lib
from tests.train_helpers import ROOT, env

CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if not p.endswith('real_run.py'))


def load(path, *args):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def presets(path):
  if 'real_run' in open(path, encoding='utf-8').read():
    return [('gpu8',), ('v5p64',), ('cpu',)]
  return [()]


@pytest.mark.parametrize('path, args', [(p, a) for p in CONFIGS for a in presets(p)],
                         ids=lambda x: os.path.basename(x) if isinstance(x, str) else ':'.join(x))
def test_config_loads_and_validates(path, args):
  c = load(path, *args)
  config_lib.validate(c)
  if args:  # real-model configs need a model directory
    assert c.model.hf_path == ''
    assert c.mesh.to_dict() and c.model.dtype == 'bfloat16'


def test_real_config_trains_a_local_hf_model_and_exports_it(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from tests.test_hf_interop import _tiny_tokenizer, make_hf
  import subprocess
  import sys
  hf_dir = str(tmp_path / 'llama')
  make_hf(transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2)).save_pretrained(hf_dir)
  _tiny_tokenizer(hf_dir)
  words = ['hello', 'world', 'prefix', 'sharing']
  data = str(tmp_path / 'prefs.jsonl')
  with open(data, 'w', encoding='utf-8') as f:
    for i in range(8):
      prompt = ' '.join(words[(i + j) % 4] for j in range(6))
      f.write(json.dumps({'prompt': prompt, 'chosen': ' hello world',
                          'rejected': ' sharing prefix sharing'}) + '\n')
  workdir = str(tmp_path / 'run')
  cmd = [sys.executable, '-m', 'prefix_dpo.train',
         '--config', os.path.join(ROOT, 'configs/llama3_8b_capybara.py:cpu'),
         '--workdir', workdir, f'--config.model.hf_path={hf_dir}',
         f'--config.data.train_files={data}', f'--config.data.eval_files={data}',
         '--config.data.format=standard', '--config.seq_len=64',
         '--config.data.num_workers=0', '--config.logging.progress_bar=False']
  result = subprocess.run(cmd, env=env(1), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = str(tmp_path / 'exported')
  result = subprocess.run([sys.executable, '-m', 'prefix_dpo.export', '--workdir', workdir,
                           '--out', out, '--dtype', 'float32'], env=env(1), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  assert reloaded.config.num_hidden_layers == 2
  assert 'tokenizer.json' in os.listdir(out)
