"""A Cloud Storage emulator (`gcp-storage-emulator`, the test extra) in its own process on 127.0.0.1.

It keeps its objects in a local directory, so it can be killed and started again (on the same port)
with the bucket as it was. `env` is all a client needs: STORAGE_EMULATOR_HOST, which
`cvt_flax.files` maps onto every storage library.

One fix to the emulator, applied in its process (`_SERVER`): its media downloads carry no
`x-goog-generation` header and ignore the `ifGenerationMatch` / `ifGenerationNotMatch`
preconditions, which Cloud Storage sends and honours. tensorstore's OCDBT driver, which writes
Orbax's arrays, reads its manifest's generation from that header, and without it every checkpoint
save fails with "Error reading .../manifest.ocdbt: Malformed StorageGeneration". The fix adds the
header and the two preconditions, as Cloud Storage documents them; nothing else is changed.
"""
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import helpers

BUCKET = 'bucket'

_SERVER = textwrap.dedent('''
    import sys
    from http import HTTPStatus
    from gcp_storage_emulator import __main__ as emulator, server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
      try:
        obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      except NotFound:
        return download(request, response, storage, *args, **kwargs)
      generation = str(obj['generation'])
      query = request.query
      if query.get('ifGenerationNotMatch', [None])[0] == generation:
        response.status = HTTPStatus.NOT_MODIFIED
        return
      if query.get('ifGenerationMatch', [generation])[0] != generation:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return
      response['x-goog-generation'] = generation
      response['x-goog-metageneration'] = str(obj['metageneration'])
      return download(request, response, storage, *args, **kwargs)

    objects.download = download_with_generation
    for _, methods in server.HANDLERS:
      for method, handler in methods.items():
        if handler is download:
          methods[method] = download_with_generation
    emulator.main(sys.argv[1:])
''')


class StorageEmulator:

  def __init__(self, data_dir):
    self.data_dir = pathlib.Path(data_dir)
    self.port = helpers.free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.env = {'STORAGE_EMULATOR_HOST': self.url}
    self.proc = None
    self.log = self.data_dir.parent / f'{self.data_dir.name}.log'

  def start(self) -> 'StorageEmulator':
    self.data_dir.mkdir(parents=True, exist_ok=True)
    with open(self.log, 'a') as log:
      self.proc = subprocess.Popen(
          [sys.executable, '-c', _SERVER, '--data-dir', str(self.data_dir), 'start', '--host', '127.0.0.1', '--port', str(self.port),
           '--default-bucket', BUCKET, '--quiet', *(['--in-memory'] if os.environ.get('EMU_MEM') else [])],
          stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
      try:
        socket.create_connection(('127.0.0.1', self.port), timeout=1).close()
        return self
      except OSError:
        if self.proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f'the storage emulator did not start:\n{self.log.read_text()}')
        time.sleep(0.1)

  def kill(self) -> None:
    if self.proc and self.proc.poll() is None:
      self.proc.send_signal(signal.SIGKILL)
      self.proc.wait()

  def url_of(self, name: str) -> str:
    return f'gs://{BUCKET}/{name}'


if __name__ == '__main__':  # by hand: python tests/storage_emulator.py [PORT]  (in memory)
  os.execv(sys.executable, [sys.executable, '-c', _SERVER, 'start', '--host', '127.0.0.1',
                            '--port', sys.argv[1] if len(sys.argv) > 1 else '9023', '--in-memory',
                            '--default-bucket', BUCKET])
