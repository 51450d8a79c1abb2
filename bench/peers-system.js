'use strict'
// presenced as a system of the peers harness (../shared/peers). Run it by path:
//   ../shared/peers/run.sh "$PWD/bench/peers-system.js" S1
// Environment:
//   PRESENCED_PYTHON   the Python that has presenced installed (default: ../.venv/bin/python)
//   PRESENCED_REGIONS  1 (one daemon) or 3 (eu, us, ap, full mesh of mTLS peer links). Default 3.
//   PRESENCED_TICK_MS  the daemons' flush tick (default: the daemon's default, 30 ms)
//   PRESENCED_TOPOLOGY mesh (default) or line: eu — us — ap, so eu↔ap updates take two hops
//   PRESENCED_HTTP_BASE a port: region i also serves its HTTP side port (/metrics) on BASE + i
// With wanDelayMs (scenario S4/WAN), every inter-region link goes through the harness's delay
// proxy, so a cross-region update pays the one-way delay once (no hub to bounce through).
const fs = require('fs')
const path = require('path')
const { execFileSync } = require('child_process')
const { freePort, startProxy } = require(path.join(process.env.PEERS_ROOT, 'systems/common'))
const { waitForPort } = require(path.join(process.env.PEERS_ROOT, 'lib/proc'))

const PROJECT = path.resolve(__dirname, '..')
const PYTHON = process.env.PRESENCED_PYTHON || path.join(PROJECT, '.venv/bin/python')
const REGIONS = (process.env.PRESENCED_REGIONS || '3') === '1' ? ['us'] : ['eu', 'us', 'ap']

function presenced (...args) {
  return execFileSync(PYTHON, ['-m', 'presenced', ...args], { cwd: PROJECT }).toString().trim()
}

module.exports = {
  name: REGIONS.length === 1 ? 'presenced-1region' : 'presenced',
  coalesces: true,
  wan: true,
  clientAdapter: path.join(__dirname, 'peers-adapter.js'),
  versions () {
    const python = execFileSync(PYTHON, ['--version']).toString().trim()
    return { presenced: presenced('--version'), python, node: process.versions.node, regions: REGIONS.length }
  },
  async start (procs, opts = {}) {
    const certs = path.join(procs.logDir, 'certs')
    fs.mkdirSync(certs, { recursive: true })
    if (REGIONS.length > 1) {
      presenced('certs', 'init', '--dir', certs, '--force')
      for (const region of REGIONS) presenced('certs', 'issue', region, '--dir', certs, '--host', '127.0.0.1', '--force')
    }
    const clientPorts = {}
    const peerPorts = {}
    for (const region of REGIONS) {
      clientPorts[region] = await freePort()
      peerPorts[region] = await freePort()
    }
    // Each pair gets one link, dialed by the region listed first; with a WAN delay the dial
    // goes through a delay proxy in front of the other region's peer port.
    const peers = Object.fromEntries(REGIONS.map(r => [r, []]))
    const line = process.env.PRESENCED_TOPOLOGY === 'line'
    for (let i = 0; i < REGIONS.length; i++) {
      for (let j = i + 1; j < REGIONS.length; j++) {
        if (line && j !== i + 1) continue
        let port = peerPorts[REGIONS[j]]
        if (opts.wanDelayMs) port = (await startProxy(procs, port, opts.wanDelayMs, { name: `proxy-${REGIONS[i]}-${REGIONS[j]}` })).port
        peers[REGIONS[i]].push(`wss://127.0.0.1:${port}`)
      }
    }
    const recs = REGIONS.map(region => {
      const args = ['-m', 'presenced', 'run', '--region', region, '--listen', `127.0.0.1:${clientPorts[region]}`,
        '--allow-anonymous', '--max-msg-rate', '2000', '--log-level', 'warning']
      if (REGIONS.length > 1) {
        args.push('--peer-listen', `127.0.0.1:${peerPorts[region]}`,
          '--tls-cert', path.join(certs, `${region}.pem`), '--tls-key', path.join(certs, `${region}.key`),
          '--tls-ca', path.join(certs, 'ca.pem'))
        if (peers[region].length) args.push('--peers', peers[region].join(','))
      }
      if (process.env.PRESENCED_TICK_MS) args.push('--tick-ms', process.env.PRESENCED_TICK_MS)
      if (process.env.PRESENCED_HTTP_BASE) args.push('--http', `127.0.0.1:${Number(process.env.PRESENCED_HTTP_BASE) + REGIONS.indexOf(region)}`)
      return procs.spawn(`presenced-${region}`, PYTHON, args, { role: 'server', cwd: PROJECT })
    })
    await Promise.all(REGIONS.map((region, i) => waitForPort(clientPorts[region], '127.0.0.1', 20000, recs[i].child)))
    if (REGIONS.length > 1) await new Promise(resolve => setTimeout(resolve, 1500)) // links up, replicas known
    return { endpoints: REGIONS.map(region => ({ region, url: `ws://127.0.0.1:${clientPorts[region]}` })) }
  }
}
