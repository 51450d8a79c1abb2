'use strict'
// presenced as a system of the peers harness (../shared/peers): run it with
//   ../shared/peers/run.sh "$PWD/bench/peers-system.js" S1
// Environment:
//   PRESENCED_PYTHON   the Python that has presenced installed (default: ../.venv/bin/python)
//   PRESENCED_TICK_MS  the daemon's flush tick (default: the daemon's default)
// One daemon process (one region) until region gossip exists.
const path = require('path')
const { execFileSync } = require('child_process')
const { freePort } = require(path.join(process.env.PEERS_ROOT, 'systems/common'))
const { waitForPort } = require(path.join(process.env.PEERS_ROOT, 'lib/proc'))

const PROJECT = path.resolve(__dirname, '..')
const PYTHON = process.env.PRESENCED_PYTHON || path.join(PROJECT, '.venv/bin/python')

module.exports = {
  name: 'presenced',
  coalesces: true,
  clientAdapter: path.join(__dirname, 'peers-adapter.js'),
  versions () {
    const version = execFileSync(PYTHON, ['-m', 'presenced', '--version']).toString().trim()
    const python = execFileSync(PYTHON, ['--version']).toString().trim()
    return { presenced: version, python, node: process.versions.node }
  },
  async start (procs) {
    const port = await freePort()
    const args = ['-m', 'presenced', 'run', '--region', 'us', '--listen', `127.0.0.1:${port}`,
      '--allow-anonymous', '--max-msg-rate', '2000', '--log-level', 'warning']
    if (process.env.PRESENCED_TICK_MS) args.push('--tick-ms', process.env.PRESENCED_TICK_MS)
    const rec = procs.spawn('presenced-us', PYTHON, args, { role: 'server', cwd: PROJECT })
    await waitForPort(port, '127.0.0.1', 20000, rec.child)
    return { endpoints: [{ region: 'us', url: `ws://127.0.0.1:${port}` }] }
  }
}
