// Artillery processor for relay.yml: authentication on the upgrade, the
// relay's frames (JSON, the relay.v1.json subprotocol), and the relay's
// latencies as custom metrics.
'use strict';

const os = require('node:os');
const { threadId } = require('node:worker_threads');

// Artillery runs max(1, CPUs - 1) worker threads on one machine, each with
// its own copy of this module and of the payload. Worker threads are
// numbered from 1, so worker t takes accounts t-1, t-1+W, t-1+2W, ...: no
// two virtual users share an account (a second socket of a user displaces
// the first, close code 4409).
const WORKERS = Math.max(1, os.cpus().length - 1);
const WORKER = Math.max(threadId - 1, 0) % WORKERS;
let taken = 0;

// How long to wait for an answer before failing the virtual user.
const ANSWER_TIMEOUT_MS = 10000;
// How long to wait for the queue-empty push. It may have arrived before
// `listen` could listen; then the live deliveries are not timed (only
// those after the push are), no harm.
const QUEUE_EMPTY_WAIT_MS = 1000;

// connect.function: the account, and Bearer authentication on the upgrade.
function authenticate(wsArgs, context, done) {
  const accounts = context.vars.accounts || [];
  const row = accounts[WORKER + WORKERS * taken++];
  if (!row || row.length < 3) {
    return done(
      new Error(
        `accounts.csv has ${accounts.length} accounts, too few for this run: ` +
          'seed one per virtual user (relay-bench seed --count N)'
      )
    );
  }
  const [username, userId, token] = row;
  context.vars.username = username;
  context.vars.userId = userId;
  // Accounts pair up, 0 with 1, 2 with 3, ...: each user sends to its
  // partner (an odd last account, to the one before it).
  const index = WORKER + WORKERS * (taken - 1);
  const partner = accounts[index ^ 1] || accounts[index - 1];
  if (!partner || partner.length < 3) {
    return done(new Error('accounts.csv needs at least two accounts: users send to each other'));
  }
  context.vars.partnerId = partner[1];
  wsArgs.options = wsArgs.options || {};
  wsArgs.options.headers = {
    ...(wsArgs.options.headers || {}),
    Authorization: `Bearer ${token}`
  };
  return done();
}

// Reads every frame from now on; done once the queue-empty push came.
function listen(context, events, next) {
  const relay = {
    ws: context.ws,
    events,
    queueEmpty: false,
    onQueueEmpty: null,
    // The message in flight: { requestId, tag, sentAt, done }.
    current: null,
    acks: 0,
    // Why the socket closed, once it has.
    closed: null
  };
  context.vars.relay = relay;
  context.ws.on('message', (data) => onFrame(relay, data));
  context.ws.on('close', (code, reason) => {
    relay.closed = `the relay closed the socket: ${code} ${reason}`;
    const current = relay.current;
    relay.current = null;
    if (current) current.fail(relay.closed);
  });
  let finished = false;
  const finish = () => {
    if (!finished) {
      finished = true;
      next();
    }
  };
  relay.onQueueEmpty = finish;
  setTimeout(finish, QUEUE_EMPTY_WAIT_MS);
}

function onFrame(relay, data) {
  let frame;
  try {
    frame = JSON.parse(data);
  } catch (err) {
    relay.events.emit('counter', 'relay.errors', 1);
    return;
  }
  const push = frame.push;
  if (push && push.queueEmpty) {
    relay.queueEmpty = true;
    if (relay.onQueueEmpty) relay.onQueueEmpty();
  } else if (push && push.deliver) {
    // Ack every delivery (receipts too), as a client must.
    const deliver = push.deliver;
    // The partner's message, sent live (after the queue-empty push; the
    // ones before it waited in the queue while this user was away): send
    // to delivery, from the sender's clock in the message (one machine,
    // one clock).
    if (relay.queueEmpty && deliver.type === 'CIPHERTEXT' && deliver.clientTimestampMs) {
      relay.events.emit('histogram', 'relay.deliver_ms', (nowMicros() - Number(deliver.clientTimestampMs)) / 1000);
      relay.events.emit('counter', 'relay.received', 1);
    }
    relay.ws.send(
      JSON.stringify({
        // Request ids are 64-bit integers; acks count from 10^12 so they
        // never collide with the sends' ids.
        requestId: String(1e12 + ++relay.acks),
        ackMessages: { messageIds: [deliver.messageId] }
      })
    );
  } else if (frame.response) {
    const response = frame.response;
    const current = relay.current;
    if (current && response.requestId === current.requestId) {
      relay.current = null;
      current.done(response);
    } else if (response.status !== 'OK') {
      relay.events.emit('counter', 'relay.errors', 1);
    }
  }
}

function elapsed(sentAt) {
  return Number(process.hrtime.bigint() - sentAt) / 1e6;
}

// Wall-clock microseconds, comparable between Artillery's worker threads.
function nowMicros() {
  return Math.round((performance.timeOrigin + performance.now()) * 1000);
}

// Sends one message to the partner and waits for its answer: DELIVERED
// once the partner has acked it, QUEUED while the partner is away.
function sendToPartner(context, events, next) {
  const relay = context.vars.relay;
  const n = (context.vars.sent = (context.vars.sent || 0) + 1);
  const requestId = String(n);
  if (relay.closed) {
    events.emit('counter', 'relay.errors', 1);
    return next(new Error(relay.closed));
  }
  const timer = setTimeout(() => {
    const current = relay.current;
    relay.current = null;
    if (current) current.fail(`no answer to request ${requestId} in ${ANSWER_TIMEOUT_MS} ms`);
  }, ANSWER_TIMEOUT_MS);
  relay.current = {
    requestId,
    sentAt: process.hrtime.bigint(),
    fail(why) {
      clearTimeout(timer);
      events.emit('counter', 'relay.errors', 1);
      next(new Error(why));
    },
    done(response) {
      clearTimeout(timer);
      if (response.status !== 'OK') {
        events.emit('counter', 'relay.errors', 1);
        return next(new Error(`${requestId}: ${response.status} ${response.message || ''}`));
      }
      const outcome = response.send && response.send.outcome;
      if (outcome === 'DELIVERED') {
        events.emit('histogram', 'relay.round_trip_ms', elapsed(this.sentAt));
        events.emit('counter', 'relay.delivered', 1);
      } else {
        events.emit('counter', 'relay.queued', 1);
      }
      return next();
    }
  };
  relay.ws.send(
    JSON.stringify({
      requestId,
      sendMessage: {
        recipientId: context.vars.partnerId,
        type: 'CIPHERTEXT',
        content: context.vars.content,
        // The send time, for the partner's delivery latency.
        clientTimestampMs: String(nowMicros())
      }
    })
  );
}

module.exports = { authenticate, listen, sendToPartner };
