'use strict'
// Client adapter for the peers harness (../shared/peers): speaks presenced's client protocol.
//
//   hello {user}            -> welcome
//   join  {room, meta:{id}} -> state   (connect() resolves here: room traffic follows)
//   update {room, meta:{x, y, t}}      (one per sendCursor)
//   diff {joins, updates}   -> onCursor(id, x, y, t) for every other session's entry
//
// presenced coalesces per tick: a diff carries the latest meta of each session that moved,
// so a receiver sees at most one cursor per sender per tick (the harness counts the rest as
// superseded, not lost, because the system declares `coalesces: true`).
const path = require('path')
// ws comes from the harness's own node_modules (this project installs no npm packages).
const WebSocket = require(require.resolve('ws', { paths: [path.join(process.env.PEERS_ROOT || '', 'node_modules'), process.cwd()] }))

function createClient () {
  let ws = null
  let myId = null
  let room = null
  let cb = null
  return {
    async connect (url, roomName, id) {
      myId = id
      room = roomName
      ws = new WebSocket(url, 'presenced.v1', { perMessageDeflate: false })
      let joined
      const ready = new Promise((resolve, reject) => {
        joined = resolve
        setTimeout(() => reject(new Error('join timeout')), 20000)
      })
      ws.on('message', data => {
        let msg
        try { msg = JSON.parse(data.toString()) } catch { return }
        if (msg.type === 'diff') {
          emit(msg.joins)
          emit(msg.updates)
        } else if (msg.type === 'welcome') {
          ws.send(JSON.stringify({ type: 'join', room, meta: { id: myId }, ref: 'j' }))
        } else if (msg.type === 'state' && msg.ref === 'j') {
          joined()
        }
      })
      function emit (presences) {
        if (!cb) return
        for (const user in presences) {
          for (const entry of presences[user]) {
            const m = entry.meta
            if (m.id !== myId && m.t !== undefined) cb(m.id, m.x, m.y, m.t)
          }
        }
      }
      await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
      ws.send(JSON.stringify({ type: 'hello', user: `c${id}`, client: 'peers-bench' }))
      await ready
    },
    sendCursor (x, y, t) {
      if (ws.readyState === 1) ws.send(JSON.stringify({ type: 'update', room, meta: { x, y, t } }))
    },
    onCursor (fn) { cb = fn },
    close () { if (ws) ws.close() }
  }
}

module.exports = { createClient }
