/*!
 * GatewayClient: the browser client of the streaming gateway. No dependencies.
 *
 *   <script src="/client.js"></script>              window.GatewayClient
 *   import { GatewayClient } from "/client.mjs";     the same class, as an ES module
 *
 * WebSocket with automatic reconnect (exponential backoff with jitter), lossless
 * resubscription from each channel's last (epoch, offset), duplicates dropped,
 * `recoveryFailed` when history no longer covers a gap, token refresh through
 * `getToken()` (or no token at all: `tokenless`, cookie authentication by the
 * application's connect hook), `rpc()` to the application's backend, and a fallback
 * to Server-Sent Events (+ the HTTP API to publish) when WebSockets are blocked.
 * Guide: docs/client.md.
 */
// `var` on purpose: in a classic script it becomes `window.GatewayClient`; in the module
// form (`/client.mjs` is this file followed by `export`s) it stays module-scoped.
// eslint-disable-next-line no-var
var GatewayClient = (function () {
  'use strict';

  const VERSION = '1.2.0';
  const CHANNEL_RE = /^[A-Za-z0-9_.:@-]{1,128}$/;
  const METHOD_RE = CHANNEL_RE; // rpc method names are spelled as channel names
  const EPOCH_RE = /^[A-Za-z0-9_-]{1,64}$/;
  const MAX_TIMER = 2147483647;
  const WS_OPEN = 1;
  const ES_CLOSED = 2;

  const DEFAULTS = {
    url: '', // gateway base URL (http(s):// or ws(s)://); '' = the page's origin
    token: null, // a JWT to start with
    getToken: null, // async () => JWT: first token, refresh before expiry, after 4001
    tokenless: false, // never send a token: the gateway's connect hook authenticates the
    //                   connection from its cookies (docs/protocol.md, "Backend hooks")
    transport: 'auto', // 'auto' (WebSocket, SSE when blocked) | 'websocket' | 'sse'
    wsFailuresBeforeSse: 3, // 'auto': failed handshakes (never opened) before using SSE
    minReconnectDelay: 500, // ms; the backoff doubles from here ...
    maxReconnectDelay: 20000, // ... up to this, each delay randomised to 50-100 %
    busyReconnectDelay: 5000, // ms, at least, after 1013 "try again later"
    refreshBeforeExpiry: 30, // s before `exp` to call getToken()
    commandTimeout: 10000, // ms to wait for a reply (or for a connection)
    pingInterval: 25000, // ms between `ping` commands that detect dead sockets; 0 = off
    sseStallTimeout: 45000, // ms: an SSE stream silent this long (no `: ping` either) is
    //                         reopened; keep it above the gateway's GATEWAY_SSE_HEARTBEAT
    //                         (15 s); 0 = off. Needs the fetch() stream (see EventSource)
    WebSocket: null, // implementations, for tests or non-browser runtimes
    EventSource: null, // null: SSE is read with fetch() where it streams (every modern
    //                    browser), else with the browser's EventSource
    fetch: null,
  };

  // Close codes of the contract.
  const CLOSE = {
    SERVICE_RESTART: 1012,
    TRY_AGAIN_LATER: 1013,
    UNAUTHORIZED: 4001,
    BAD_REQUEST: 4002,
    SLOW_CONSUMER: 4008,
    INSUFFICIENT_STATE: 4009, // publications lost on their way to the worker: resubscribe
  };

  // HTTP status -> error code, for the HTTP API (SSE mode).
  const HTTP_CODES = {
    400: 'bad_request',
    401: 'unauthorized',
    403: 'forbidden',
    404: 'not_found',
    413: 'too_large',
    429: 'rate_limited',
    503: 'unavailable',
  };

  /** An error with the contract's `code` (`forbidden`, `not_found`, … or `disconnected`, `timeout`). */
  class GatewayError extends Error {
    constructor(code, message, extra) {
      super(message || code);
      this.name = 'GatewayError';
      this.code = code;
      if (extra) Object.assign(this, extra);
    }
  }

  // ------------------------------------------------------------------ helpers

  function toInt(v) {
    if (typeof v === 'number' && Number.isFinite(v)) return Math.trunc(v);
    if (typeof v === 'string' && /^\d{1,19}$/.test(v)) return parseInt(v, 10);
    return null;
  }

  function jitter(ms) {
    return Math.round(ms / 2 + Math.random() * (ms / 2));
  }

  /** `exp` (seconds) from a JWT's payload, or null. The signature is not checked here. */
  function tokenExpiry(token) {
    try {
      const part = String(token).split('.')[1];
      if (!part) return null;
      let b64 = part.replace(/-/g, '+').replace(/_/g, '/');
      while (b64.length % 4) b64 += '=';
      const payload = JSON.parse(decodeURIComponent(
        Array.from(atob(b64), (c) => '%' + c.charCodeAt(0).toString(16).padStart(2, '0')).join('')
      ));
      return typeof payload.exp === 'number' && Number.isFinite(payload.exp) ? payload.exp : null;
    } catch (err) {
      return null;
    }
  }

  /** An SSE cursor (`channel~epoch~offset,…`, docs/protocol.md) as {channel: {epoch, offset}}. */
  function parseCursor(cursor) {
    const out = {};
    if (typeof cursor !== 'string' || !cursor) return out;
    for (const entry of cursor.split(',')) {
      const parts = entry.split('~');
      if (parts.length !== 3) continue;
      const offset = toInt(parts[2]);
      if (offset !== null) out[parts[0]] = { epoch: parts[1], offset };
    }
    return out;
  }

  function baseUrls(url) {
    const loc = typeof location !== 'undefined' && location && location.href ? location : null;
    let u;
    try {
      u = new URL(url || (loc ? loc.origin : 'http://127.0.0.1:8000'), loc ? loc.href : undefined);
    } catch (err) {
      throw new GatewayError('bad_request', 'invalid gateway url: ' + url);
    }
    const scheme = { 'ws:': 'http:', 'wss:': 'https:' }[u.protocol] || u.protocol;
    const http = scheme + '//' + u.host + u.pathname.replace(/\/+$/, '');
    return { http, ws: http.replace(/^http/, 'ws') };
  }

  function reportLater(err) {
    // A listener threw: surface it (console, window.onerror) without breaking the client.
    setTimeout(() => {
      throw err;
    }, 0);
  }

  // ------------------------------------------------------------------ events

  class Emitter {
    constructor() {
      this._listeners = new Map();
    }

    /** Add a listener; returns a function that removes it. */
    on(event, fn) {
      if (typeof fn !== 'function') throw new TypeError('listener must be a function');
      if (!this._listeners.has(event)) this._listeners.set(event, new Set());
      this._listeners.get(event).add(fn);
      return () => this.off(event, fn);
    }

    off(event, fn) {
      const set = this._listeners.get(event);
      if (set) set.delete(fn);
      return this;
    }

    once(event, fn) {
      const off = this.on(event, (payload) => {
        off();
        fn.call(this, payload);
      });
      return off;
    }

    _emit(event, payload) {
      const set = this._listeners.get(event);
      if (!set || !set.size) return;
      for (const fn of Array.from(set)) {
        try {
          fn.call(this, payload);
        } catch (err) {
          reportLater(err);
        }
      }
    }
  }

  // ------------------------------------------------------------------ subscription

  const SUB_HANDLERS = {
    onPublication: 'publication',
    onJoin: 'join',
    onLeave: 'leave',
    onSubscribed: 'subscribed',
    onRecoveryFailed: 'recoveryFailed',
    onUnsubscribed: 'unsubscribed',
    onError: 'error',
  };

  /**
   * One channel. Survives reconnects: `epoch`/`offset` are the position of the last
   * publication delivered (or of the subscription's start), sent back as `since`.
   */
  class Subscription extends Emitter {
    constructor(client, channel, options) {
      super();
      options = options || {};
      this.client = client;
      this.channel = channel;
      this.state = 'pending'; // pending | subscribed | unsubscribed | failed
      this.epoch = null;
      this.offset = null;
      this.recovered = null; // of the last (re)subscription; null over SSE until a gap
      this._everSubscribed = false;
      for (const [opt, event] of Object.entries(SUB_HANDLERS)) {
        if (typeof options[opt] === 'function') this.on(event, options[opt]);
      }
      const since = options.since;
      if (since && typeof since === 'object' && since.epoch != null && toInt(since.offset) !== null) {
        this.epoch = String(since.epoch);
        this.offset = toInt(since.offset);
      }
      this._ready = new Promise((resolve, reject) => {
        this._resolve = resolve;
        this._reject = reject;
      });
      this._ready.catch(() => {}); // the caller's promise reports it; never "unhandled" here
    }

    /** The resume position, or null before the first subscription. */
    get position() {
      return this.epoch === null || this.offset === null ? null : { epoch: this.epoch, offset: this.offset };
    }

    unsubscribe() {
      return this.client.unsubscribe(this.channel);
    }

    publish(data) {
      return this.client.publish(this.channel, data);
    }

    presence() {
      return this.client.presence(this.channel);
    }

    history(options) {
      return this.client.history(this.channel, options);
    }

    _fail(err) {
      this.state = 'failed';
      this._emit('error', err);
      this._reject(err);
    }
  }

  // ------------------------------------------------------------------ SSE over fetch

  const EOL = /\r\n|\r|\n/g;

  /**
   * An SSE stream read with `fetch()`, with the part of EventSource's interface the client
   * uses (`onopen`, `onmessage`, `onerror`, `addEventListener`, `readyState`, `close`;
   * events carry `type`, `data`, `lastEventId`). Unlike EventSource it sees every byte,
   * the gateway's `: ping` comments included, so a stream that went silent (a connection
   * that died without a FIN, a proxy that stopped forwarding) is given up after
   * `stallTimeout` ms; and a refused stream's HTTP status and error reach `onerror`
   * (`{status, code, reason}`). It never reconnects by itself: it ends CLOSED and the
   * client opens the next one, with its own positions as the cursor and a fresh token.
   */
  class FetchEventSource {
    constructor(url, init) {
      init = init || {};
      this.url = url;
      this.readyState = 0; // CONNECTING, OPEN, CLOSED as EventSource's
      this.retry = null; // ms, from the stream's `retry:` field
      this.onopen = this.onmessage = this.onerror = null;
      this._listeners = new Map();
      this._abort = new AbortController();
      this._stallTimeout = init.stallTimeout > 0 ? init.stallTimeout : 0;
      this._timer = null;
      this._last = 0;
      // The parser's state (the HTML standard's "event stream interpretation").
      this._rest = '';
      this._data = null;
      this._type = '';
      this._id = '';
      if (init.openTimeout > 0) this._timer = setTimeout(() => this._check(), init.openTimeout);
      this._run(init.fetch || fetch);
    }

    /** Whether this runtime can read a response as a stream (else: EventSource). */
    static supported(f) {
      return (
        !FetchEventSource.unsupported &&
        typeof (f || (typeof fetch !== 'undefined' ? fetch : null)) === 'function' &&
        typeof AbortController === 'function' &&
        typeof TextDecoder === 'function'
      );
    }

    addEventListener(type, fn) {
      if (!this._listeners.has(type)) this._listeners.set(type, new Set());
      this._listeners.get(type).add(fn);
    }

    removeEventListener(type, fn) {
      const set = this._listeners.get(type);
      if (set) set.delete(fn);
    }

    close() {
      if (this.readyState === ES_CLOSED) return;
      this.readyState = ES_CLOSED;
      clearTimeout(this._timer);
      this._abort.abort();
    }

    _fail(info) {
      if (this.readyState === ES_CLOSED) return;
      this.close();
      if (this.onerror) this._call(this.onerror, Object.assign({ type: 'error' }, info));
    }

    _call(fn, ev) {
      try {
        fn.call(this, ev);
      } catch (err) {
        reportLater(err); // as EventSource: a throwing handler does not end the stream
      }
    }

    /** The open's deadline, then the stall watch: re-armed for what is left. */
    _check() {
      this._timer = null;
      if (this.readyState === ES_CLOSED) return;
      if (this.readyState === 0) return this._fail({ reason: 'no answer' });
      const left = this._stallTimeout - (Date.now() - this._last);
      if (left <= 0) return this._fail({ reason: 'silent for ' + this._stallTimeout + ' ms' });
      this._timer = setTimeout(() => this._check(), left);
    }

    async _run(f) {
      const scope = typeof globalThis !== 'undefined' ? globalThis : undefined;
      let res;
      try {
        res = await f.call(scope, this.url, {
          headers: { Accept: 'text/event-stream' },
          cache: 'no-store',
          signal: this._abort.signal,
        });
      } catch (err) {
        return this._fail({ reason: String((err && err.message) || err) });
      }
      if (this.readyState === ES_CLOSED) return;
      const type = (res.headers && res.headers.get('content-type')) || '';
      if (res.status !== 200 || !/^text\/event-stream/i.test(type)) {
        let body = null;
        try {
          body = await res.json();
        } catch (err) {
          /* not the gateway's JSON */
        }
        const e = (body && body.error) || {};
        return this._fail({ status: res.status, code: e.code, reason: e.message || 'HTTP ' + res.status });
      }
      if (!res.body || typeof res.body.getReader !== 'function') {
        FetchEventSource.unsupported = true; // no streamed bodies here: EventSource from now on
        return this._fail({ reason: 'fetch() cannot stream in this runtime' });
      }
      const reader = res.body.getReader();
      const decoder = new TextDecoder(); // UTF-8; drops a leading BOM, as the standard asks
      clearTimeout(this._timer);
      this.readyState = 1;
      this._last = Date.now();
      if (this._stallTimeout) this._timer = setTimeout(() => this._check(), this._stallTimeout);
      if (this.onopen) this._call(this.onopen, { type: 'open' });
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (this.readyState === ES_CLOSED) return;
          if (done) break;
          this._last = Date.now();
          this._feed(decoder.decode(value, { stream: true }));
        }
      } catch (err) {
        return this._fail({ reason: String((err && err.message) || err) });
      }
      this._fail({ reason: 'stream ended' });
    }

    _feed(text) {
      const s = this._rest + text;
      let start = 0;
      // The rest holds no line end but maybe a last "\r" (the first half of "\r\n").
      EOL.lastIndex = Math.max(0, this._rest.length - 1);
      let m;
      while ((m = EOL.exec(s)) !== null) {
        if (m[0] === '\r' && m.index === s.length - 1) break; // wait for what follows
        this._line(s.slice(start, m.index));
        start = EOL.lastIndex;
        if (this.readyState === ES_CLOSED) return; // a handler closed it
      }
      this._rest = s.slice(start);
    }

    _line(line) {
      if (line === '') return this._dispatch();
      if (line.charCodeAt(0) === 58) return; // ':' a comment (the gateway's ping)
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.charCodeAt(0) === 32) value = value.slice(1);
      if (field === 'data') {
        if (this._data === null) this._data = [];
        this._data.push(value);
      } else if (field === 'event') {
        this._type = value;
      } else if (field === 'id') {
        if (value.indexOf('\0') < 0) this._id = value;
      } else if (field === 'retry') {
        if (/^\d+$/.test(value)) this.retry = parseInt(value, 10);
      }
    }

    _dispatch() {
      const data = this._data;
      const type = this._type || 'message';
      this._data = null;
      this._type = '';
      if (data === null) return;
      const ev = { type, data: data.join('\n'), lastEventId: this._id };
      if (type === 'message' && this.onmessage) this._call(this.onmessage, ev);
      const set = this._listeners.get(type);
      if (set) for (const fn of Array.from(set)) this._call(fn, ev);
    }
  }
  FetchEventSource.unsupported = false;

  // ------------------------------------------------------------------ client

  class GatewayClient extends Emitter {
    constructor(options) {
      super();
      this.options = Object.assign({}, DEFAULTS, options || {});
      const o = this.options;
      if (!['auto', 'websocket', 'sse'].includes(o.transport)) {
        throw new GatewayError('bad_request', 'transport must be auto, websocket or sse');
      }
      this._urls = baseUrls(o.url);
      this.state = 'disconnected'; // disconnected | connecting | connected | reconnecting
      this.transport = null; // 'websocket' | 'sse' while connected
      this._mode = o.transport === 'sse' || (o.transport === 'auto' && !this._WebSocket()) ? 'sse' : 'websocket';
      this._token = o.token || null;
      this._tokenRejected = false;
      this._tokenPromise = null;
      this._subs = new Map();
      this._pending = new Map();
      this._nextId = 1;
      this._waiters = new Set();
      this._active = false;
      this._everConnected = false;
      this._attempt = 0;
      this._seq = 0;
      this._ws = null;
      this._wsOpened = false;
      this._wsReady = false;
      this._wsEverOpened = false;
      this._wsFailures = 0;
      this._es = null;
      this._sseReopenQueued = false;
      this._reconnectTimer = null;
      this._refreshTimer = null;
      this._pingTimer = null;
      this._onOnline = () => {
        if (this._active && this._reconnectTimer) this._reconnectNow();
      };
      if (this._token) this._scheduleRefresh();
    }

    // -------------------------------------------------------------- public API

    /** Start connecting (and keep reconnecting until `disconnect()`). */
    connect() {
      if (this._active) return this;
      this._active = true;
      this._attempt = 0;
      if (this._token) this._scheduleRefresh();
      if (typeof addEventListener === 'function') addEventListener('online', this._onOnline);
      this._open();
      return this;
    }

    /** Close the connection and stop reconnecting. Subscriptions are kept for `connect()`. */
    disconnect() {
      if (this._active) this._stop('disconnected', { code: 1000, reason: 'client disconnect' });
      return this;
    }

    /**
     * Subscribe to `channel`. Options: `since` ({epoch, offset}: resume from there),
     * `onPublication`, `onJoin`, `onLeave`, `onSubscribed`, `onRecoveryFailed`, `onError`.
     * Resolves with the Subscription once the gateway confirmed it (it then stays
     * subscribed across reconnects); rejects if the gateway refuses it.
     */
    subscribe(channel, options) {
      if (typeof channel !== 'string' || !CHANNEL_RE.test(channel)) {
        return Promise.reject(new GatewayError('bad_request', 'invalid channel name: ' + channel));
      }
      if (this._subs.has(channel)) {
        return Promise.reject(new GatewayError('bad_request', 'already subscribed to ' + channel));
      }
      const sub = new Subscription(this, channel, options);
      this._subs.set(channel, sub);
      if (this._ws && this._wsOpened) this._wsSubscribe(this._ws, sub);
      else if (this._mode === 'sse' && this._active && this.state === 'connected') this._queueSseReopen();
      return sub._ready;
    }

    /** Stop receiving `channel`. */
    unsubscribe(channel) {
      const sub = this._subs.get(channel);
      if (!sub) return Promise.resolve();
      this._subs.delete(channel);
      sub.state = 'unsubscribed';
      sub._emit('unsubscribed', { channel });
      this._emit('unsubscribed', { channel });
      sub._reject(new GatewayError('unsubscribed', 'unsubscribed before the gateway confirmed'));
      if (this._ws && this._wsOpened) {
        return this._send(this._ws, { op: 'unsubscribe', channel }).then(
          () => undefined,
          (err) => {
            if (err.code !== 'disconnected' && err.code !== 'timeout') throw err;
          }
        );
      }
      if (this._mode === 'sse' && this._es) this._queueSseReopen();
      return Promise.resolve();
    }

    /** The token in use (the latest one given or fetched). */
    get token() {
      return this._token;
    }

    /** The Subscription of `channel`, or undefined. */
    getSubscription(channel) {
      return this._subs.get(channel);
    }

    /** Every current Subscription, in the order they were made. */
    get subscriptions() {
      return Array.from(this._subs.values());
    }

    /** Publish `data` to `channel`: resolves with {offset, epoch}. */
    async publish(channel, data) {
      await this._whenConnected();
      if (this.transport === 'sse') {
        return this._http('POST', '/api/publish', { channel, data: data === undefined ? null : data });
      }
      return this._send(this._ws, { op: 'publish', channel, data: data === undefined ? null : data });
    }

    /** Who is subscribed to `channel` (presence channels only): {clients: [...]}. */
    async presence(channel) {
      await this._whenConnected();
      if (this.transport === 'sse') {
        return this._http('GET', '/api/channels/' + encodeURIComponent(channel) + '/presence');
      }
      return this._send(this._ws, { op: 'presence', channel });
    }

    /**
     * Recent publications of `channel`: {publications, offset, epoch}; each publication
     * carries `channel` and `epoch` too. Options: `limit` (the last N), `since`
     * ({epoch, offset}: what came after; `not_found` if history lost it).
     */
    async history(channel, options) {
      options = options || {};
      await this._whenConnected();
      const limit = toInt(options.limit);
      const since = options.since && toInt(options.since.offset) !== null ? options.since : null;
      let result;
      if (this.transport === 'sse') {
        const q = new URLSearchParams();
        if (since) q.set('since_offset', String(toInt(since.offset)));
        if (limit !== null) q.set('limit', String(limit));
        const qs = q.toString();
        result = await this._http('GET', '/api/channels/' + encodeURIComponent(channel) + '/history' + (qs ? '?' + qs : ''));
        if (since) {
          // As the `history` command does: not_found unless history covers `since`.
          const pubs = Array.isArray(result.publications) ? result.publications : [];
          const from = toInt(since.offset);
          const covered =
            String(since.epoch) === String(result.epoch) &&
            from <= toInt(result.offset) &&
            (from === toInt(result.offset) || (pubs.length > 0 && pubs[0].offset === from + 1));
          if (!covered) throw new GatewayError('not_found', 'history of ' + channel + ' no longer covers that position');
        }
      } else {
        const cmd = { op: 'history', channel };
        if (limit !== null) cmd.limit = limit;
        if (since) cmd.since = { offset: toInt(since.offset), epoch: String(since.epoch) };
        result = await this._send(this._ws, cmd);
      }
      const epoch = result.epoch != null ? String(result.epoch) : null;
      const publications = (Array.isArray(result.publications) ? result.publications : []).map((p) =>
        Object.assign({ channel, epoch }, p)
      );
      return { publications, offset: toInt(result.offset), epoch };
    }

    /**
     * Call `method` of the application's backend (the gateway's rpc hook) with `data`:
     * resolves with `{data}`, the backend's answer; rejects with its refusal, or
     * `not_found` when no rpc hook takes that method. Over WebSocket only: the SSE
     * fallback has no way to send it (`unavailable`).
     */
    async rpc(method, data) {
      if (typeof method !== 'string' || !METHOD_RE.test(method)) {
        throw new GatewayError('bad_request', 'invalid rpc method: ' + method);
      }
      await this._whenConnected();
      if (this.transport !== 'websocket') {
        throw new GatewayError('unavailable', 'rpc needs a WebSocket; this client is on SSE');
      }
      const result = await this._send(this._ws, { op: 'rpc', method, data: data === undefined ? null : data });
      return { data: result.data === undefined ? null : result.data };
    }

    /** Use `token` from now on; on an open WebSocket it is sent as a `refresh`. */
    async setToken(token) {
      if (typeof token !== 'string' || !token) throw new GatewayError('bad_request', 'token must be a non-empty string');
      this._token = token;
      this._tokenRejected = false;
      this._scheduleRefresh();
      if (this._ws && this._wsReady) {
        await this._send(this._ws, { op: 'refresh', token });
        this._emit('token', { refreshed: true });
      }
    }

    // -------------------------------------------------------------- state

    /** Stop for good (until `connect()`): `disconnect()` or an error no retry can fix. */
    _stop(code, info, error) {
      this._active = false;
      this._seq += 1;
      clearTimeout(this._reconnectTimer);
      this._reconnectTimer = null;
      clearTimeout(this._refreshTimer);
      this._refreshTimer = null;
      if (typeof removeEventListener === 'function') removeEventListener('online', this._onOnline);
      this._closeWs(1000, 'client disconnect');
      this._closeEs();
      const message = error ? error.message : 'the client disconnected';
      this._failPending(code, message);
      this._failWaiters(code, message);
      for (const sub of this._subs.values()) if (sub.state === 'subscribed') sub.state = 'pending';
      this.transport = null;
      this._setState('disconnected', info);
      if (error) this._emit('error', error);
    }

    _setState(state, info) {
      if (this.state === state) return;
      const previous = this.state;
      this.state = state;
      const payload = Object.assign({ state, previous }, info || {});
      this._emit('state', payload);
      this._emit(state, payload);
    }

    _connected(transport) {
      this._attempt = 0;
      this._everConnected = true;
      this.transport = transport;
      this._setState('connected', { transport });
      for (const w of Array.from(this._waiters)) w.resolve();
    }

    _whenConnected() {
      if (this.state === 'connected') return Promise.resolve();
      if (!this._active) {
        return Promise.reject(new GatewayError('disconnected', 'not connected: call connect() first'));
      }
      return new Promise((resolve, reject) => {
        const w = {
          resolve: () => {
            clearTimeout(w.timer);
            this._waiters.delete(w);
            resolve();
          },
          reject: (err) => {
            clearTimeout(w.timer);
            this._waiters.delete(w);
            reject(err);
          },
        };
        w.timer = setTimeout(() => w.reject(new GatewayError('timeout', 'not connected within ' + this.options.commandTimeout + ' ms')), this.options.commandTimeout);
        this._waiters.add(w);
      });
    }

    _failWaiters(code, message) {
      for (const w of Array.from(this._waiters)) w.reject(new GatewayError(code, message));
    }

    _failPending(code, message) {
      for (const [id, p] of Array.from(this._pending)) {
        clearTimeout(p.timer);
        this._pending.delete(id);
        p.reject(new GatewayError(code, message));
      }
    }

    // -------------------------------------------------------------- connecting

    async _open() {
      const seq = ++this._seq;
      this._setState(this._everConnected ? 'reconnecting' : 'connecting', { transport: this._mode });
      let token;
      try {
        token = await this._currentToken();
      } catch (err) {
        if (seq !== this._seq || !this._active) return;
        this._emit('error', err);
        this._retry({ reason: 'no token: ' + err.message });
        return;
      }
      if (seq !== this._seq || !this._active) return;
      if (this._mode === 'sse') this._openSse(token, seq);
      else this._openWs(token);
    }

    _backoff() {
      const cap = Math.min(this.options.maxReconnectDelay, this.options.minReconnectDelay * Math.pow(2, this._attempt));
      this._attempt = Math.min(this._attempt + 1, 30);
      return jitter(cap);
    }

    /** Schedule the next attempt; `delay` overrides the backoff. */
    _retry(info, delay) {
      if (!this._active) return;
      clearTimeout(this._reconnectTimer);
      const ms = delay == null ? this._backoff() : delay;
      this.transport = null;
      this._setState(this._everConnected ? 'reconnecting' : 'connecting', info);
      this._emit('retry', Object.assign({ delay: ms, attempt: this._attempt }, info || {}));
      this._reconnectTimer = setTimeout(() => {
        this._reconnectTimer = null;
        this._open();
      }, ms);
    }

    _reconnectNow() {
      clearTimeout(this._reconnectTimer);
      this._reconnectTimer = null;
      this._open();
    }

    // -------------------------------------------------------------- tokens

    _tokenStale() {
      if (!this._token || this._tokenRejected) return true;
      const exp = tokenExpiry(this._token);
      return exp !== null && exp * 1000 - Date.now() < 5000;
    }

    /** The token for a new connection: the latest one, or a new one when it is stale;
     * null with `tokenless`. */
    async _currentToken() {
      if (this.options.tokenless) return null;
      if (!this._tokenStale()) return this._token;
      if (typeof this.options.getToken !== 'function') {
        if (this._token && !this._tokenRejected) return this._token; // let the gateway judge
        throw new GatewayError('unauthorized', this._token ? 'the token was rejected and there is no getToken()' : 'no token: pass `token` or `getToken`');
      }
      return this._fetchToken();
    }

    /** Call getToken() (one call at a time) and keep what it returns. */
    _fetchToken() {
      if (!this._tokenPromise) {
        this._tokenPromise = (async () => {
          try {
            const token = await this.options.getToken();
            if (typeof token !== 'string' || !token) throw new GatewayError('unauthorized', 'getToken() did not return a token');
            this._token = token;
            this._tokenRejected = false;
            this._scheduleRefresh();
            return token;
          } finally {
            this._tokenPromise = null;
          }
        })();
      }
      return this._tokenPromise;
    }

    _scheduleRefresh(delay) {
      clearTimeout(this._refreshTimer);
      this._refreshTimer = null;
      if (typeof this.options.getToken !== 'function') return;
      if (delay == null) {
        const exp = tokenExpiry(this._token);
        if (exp === null) return;
        const left = exp * 1000 - Date.now();
        // ~30 s before expiry; for short-lived tokens halfway through what is left.
        const ahead = Math.min(this.options.refreshBeforeExpiry * 1000, left / 2);
        delay = Math.max(1000, left - ahead);
      }
      this._refreshTimer = setTimeout(() => this._refresh(), Math.min(delay, MAX_TIMER));
    }

    async _refresh() {
      this._refreshTimer = null;
      if (!this._active) return;
      let token;
      try {
        token = await this._fetchToken();
      } catch (err) {
        this._emit('error', new GatewayError('unauthorized', 'getToken() failed: ' + (err && err.message)));
        const exp = tokenExpiry(this._token);
        const left = exp === null ? 20000 : exp * 1000 - Date.now();
        this._scheduleRefresh(Math.max(1000, Math.min(10000, left / 2)));
        return;
      }
      const ws = this._ws;
      if (!ws || !this._wsReady) {
        if (this._mode === 'sse' && this._es && this.state === 'connected') {
          // A stream carries its token for life and the gateway ends it at `exp`:
          // reopen it with the new one now, every channel resuming from its position.
          this._queueSseReopen();
          this._emit('token', { refreshed: true });
          return;
        }
        this._emit('token', { refreshed: false });
        return; // the next connection uses it
      }
      try {
        await this._send(ws, { op: 'refresh', token });
        this._emit('token', { refreshed: true });
      } catch (err) {
        if (err.code !== 'disconnected') this._emit('error', err);
      }
    }

    // -------------------------------------------------------------- WebSocket

    _WebSocket() {
      return this.options.WebSocket || (typeof WebSocket !== 'undefined' ? WebSocket : null);
    }

    _openWs(token) {
      const WS = this._WebSocket();
      let ws;
      this._wsOpened = false;
      this._wsReady = false;
      try {
        ws = new WS(this._urls.ws + '/ws' + (token ? '?token=' + encodeURIComponent(token) : ''));
      } catch (err) {
        this._ws = null;
        this._wsClosed(null, 1006, String(err && err.message));
        return;
      }
      this._ws = ws;
      // A server that accepts the connection and never answers the handshake: the
      // browser would wait for minutes. Given up after commandTimeout, and tried again.
      const handshake = setTimeout(() => {
        if (this._ws === ws && !this._wsOpened) this._abortWs(ws, 'no handshake answer');
      }, this.options.commandTimeout);
      ws.onopen = () => {
        clearTimeout(handshake);
        if (this._ws === ws) this._wsOpen(ws);
      };
      ws.onmessage = (ev) => {
        if (this._ws === ws) this._wsMessage(ev.data);
      };
      ws.onerror = () => {}; // a close event follows
      ws.onclose = (ev) => {
        clearTimeout(handshake);
        this._wsClosed(ws, ev.code, ev.reason);
      };
    }

    _wsOpen(ws) {
      this._wsOpened = true;
      this._wsEverOpened = true;
      this._wsFailures = 0;
      // Subscriptions first (with `since`), then a ping: commands run in order, so its
      // reply means every subscription is back. A refused handshake (1012, 1013, 4001)
      // closes before any reply and is never "connected".
      for (const sub of this._subs.values()) this._wsSubscribe(ws, sub);
      this._send(ws, { op: 'ping' }).then(
        () => {
          if (this._ws !== ws) return;
          this._wsReady = true;
          this._startPing(ws);
          this._connected('websocket');
        },
        (err) => {
          if (this._ws === ws && err.code === 'timeout') this._abortWs(ws, 'no reply to ping');
        }
      );
    }

    _wsSubscribe(ws, sub) {
      const resuming = sub.position !== null;
      const cmd = { op: 'subscribe', channel: sub.channel };
      if (resuming) cmd.since = { offset: sub.offset, epoch: sub.epoch };
      sub.state = 'pending';
      this._send(ws, cmd).then(
        (result) => {
          if (this._ws !== ws || this._subs.get(sub.channel) !== sub) return;
          this._subscribed(sub, result, resuming, 'websocket');
        },
        (err) => {
          if (this._ws !== ws || this._subs.get(sub.channel) !== sub) return;
          if (err.code === 'disconnected') return; // resubscribed on the next connection
          if (err.code === 'timeout') return this._abortWs(ws, 'no reply to subscribe');
          if (err.code === 'internal') {
            setTimeout(() => {
              if (this._ws === ws && this._subs.get(sub.channel) === sub) this._wsSubscribe(ws, sub);
            }, jitter(2000));
            return;
          }
          this._subs.delete(sub.channel);
          sub._fail(err);
          this._emit('error', err);
        }
      );
    }

    _wsMessage(raw) {
      let msg;
      try {
        msg = JSON.parse(raw);
      } catch (err) {
        return;
      }
      if (!msg || typeof msg !== 'object') return;
      if ('ok' in msg) {
        const p = msg.id != null ? this._pending.get(msg.id) : null;
        if (!p) {
          if (msg.ok === false) this._emit('error', new GatewayError((msg.error && msg.error.code) || 'error', msg.error && msg.error.message));
          return;
        }
        this._pending.delete(msg.id);
        clearTimeout(p.timer);
        if (msg.ok) {
          p.resolve(msg.result && typeof msg.result === 'object' ? msg.result : {});
        } else {
          const e = msg.error || {};
          p.reject(new GatewayError(e.code || 'error', e.message || e.code || 'request failed'));
        }
        return;
      }
      this._push(msg);
    }

    _send(ws, cmd, timeout) {
      return new Promise((resolve, reject) => {
        if (!ws || ws.readyState !== WS_OPEN) {
          reject(new GatewayError('disconnected', 'not connected'));
          return;
        }
        const id = this._nextId++;
        const timer = setTimeout(() => {
          this._pending.delete(id);
          reject(new GatewayError('timeout', 'no reply to ' + cmd.op + ' within ' + (timeout || this.options.commandTimeout) + ' ms'));
        }, timeout || this.options.commandTimeout);
        this._pending.set(id, { resolve, reject, timer });
        try {
          ws.send(JSON.stringify(Object.assign({ id }, cmd)));
        } catch (err) {
          clearTimeout(timer);
          this._pending.delete(id);
          reject(new GatewayError('disconnected', String(err && err.message)));
        }
      });
    }

    _startPing(ws) {
      clearInterval(this._pingTimer);
      this._pingTimer = null;
      const every = this.options.pingInterval;
      if (!every) return;
      this._pingTimer = setInterval(() => {
        if (this._ws !== ws) return;
        this._send(ws, { op: 'ping' }, Math.min(this.options.commandTimeout, every)).catch((err) => {
          if (this._ws === ws && err.code === 'timeout') this._abortWs(ws, 'no reply to ping');
        });
      }, every);
    }

    /** The socket looks dead: treat it as closed now (its close event may take minutes). */
    _abortWs(ws, reason) {
      try {
        ws.close(4000, reason);
      } catch (err) {
        /* already closing */
      }
      this._wsClosed(ws, 1006, reason);
    }

    _closeWs(code, reason) {
      const ws = this._ws;
      if (!ws) return;
      this._ws = null;
      this._wsOpened = false;
      this._wsReady = false;
      clearInterval(this._pingTimer);
      this._pingTimer = null;
      ws.onopen = ws.onmessage = ws.onclose = null;
      try {
        ws.close(code, reason);
      } catch (err) {
        /* already closed */
      }
    }

    _wsClosed(ws, code, reason) {
      if (ws !== null && this._ws !== ws) return;
      const opened = this._wsOpened;
      const ready = this._wsReady;
      if (ws) ws.onopen = ws.onmessage = ws.onclose = null;
      this._ws = null;
      this._wsOpened = false;
      this._wsReady = false;
      clearInterval(this._pingTimer);
      this._pingTimer = null;
      this._failPending('disconnected', 'the connection closed (' + code + ')');
      for (const sub of this._subs.values()) if (sub.state === 'subscribed') sub.state = 'pending';
      if (!this._active) return;
      const info = { code, reason: reason || '', transport: 'websocket' };

      if (!opened) {
        this._wsFailures += 1;
        if (this.options.transport === 'auto' && !this._wsEverOpened && this._wsFailures >= this.options.wsFailuresBeforeSse) {
          // Never opened, N times in a row: WebSockets are blocked here (proxy, firewall),
          // if the gateway answers HTTP; a gateway that is down is waited for, on WebSocket.
          return this._fallBackIfReachable(info);
        }
      }
      let delay = this._backoff();
      if (code === CLOSE.UNAUTHORIZED) {
        this._tokenRejected = true;
        if (typeof this.options.getToken !== 'function' || this.options.tokenless) {
          // Nothing can make the next attempt succeed: stop.
          const err = this.options.tokenless
            ? new GatewayError('unauthorized', 'the gateway refused the connection (' + (reason || code) + ')')
            : new GatewayError('unauthorized', 'the gateway refused the token (' + (reason || code) + ') and there is no getToken()');
          return this._stop('unauthorized', info, err);
        }
        if (ready) delay = jitter(500); // a new token, then straight back
      } else if (code === CLOSE.SERVICE_RESTART || code === CLOSE.SLOW_CONSUMER || code === CLOSE.INSUFFICIENT_STATE) {
        if (ready) delay = jitter(1000); // come back soon (elsewhere) and recover from history
      } else if (code === CLOSE.TRY_AGAIN_LATER) {
        // At least busyReconnectDelay (jitter above it, never below), spread over half as much.
        const busy = this.options.busyReconnectDelay;
        delay = Math.max(delay, Math.round(busy + Math.random() * (busy / 2)));
      }
      this._retry(info, delay);
    }

    /** WebSocket handshakes keep failing: switch to SSE if the gateway answers HTTP
     * (something between blocks upgrades), else keep trying WebSocket with backoff. */
    _fallBackIfReachable(info) {
      const switchToSse = () => {
        this._mode = 'sse';
        this._emit('transport', { transport: 'sse', reason: 'WebSocket failed ' + this._wsFailures + ' times' });
        this._retry(info, 0);
      };
      let f = null;
      try {
        f = this._fetch();
      } catch (e) {
        return switchToSse(); // no way to tell: as before
      }
      const scope = typeof globalThis !== 'undefined' ? globalThis : undefined;
      this._setState(this._everConnected ? 'reconnecting' : 'connecting', info);
      Promise.resolve()
        .then(() => f.call(scope, this._urls.http + '/healthz', { cache: 'no-store', mode: 'no-cors' }))
        .then(
          () => this._active && this._mode !== 'sse' && switchToSse(),
          () => this._active && this._retry(info, this._backoff()), // down: not a proxy's doing
        );
    }

    // -------------------------------------------------------------- pushes

    _push(msg) {
      const channel = msg.channel;
      const sub = this._subs.get(channel);
      if (msg.event === 'join' || msg.event === 'leave') {
        const ev = { channel, event: msg.event, client: msg.client || {} };
        if (sub) sub._emit(msg.event, ev);
        this._emit(msg.event, ev);
        return;
      }
      if (!sub || sub.state === 'unsubscribed') return;
      if (!this._accept(sub, msg)) return;
      const pub = { channel, offset: toInt(msg.offset), epoch: msg.epoch != null ? String(msg.epoch) : null, data: msg.data };
      sub._emit('publication', pub);
      this._emit('publication', pub);
    }

    /** In order, at most once per (epoch, offset); notices a new epoch. */
    _accept(sub, msg) {
      const offset = toInt(msg.offset);
      const epoch = msg.epoch != null ? String(msg.epoch) : null;
      if (offset === null) return true;
      if (sub.epoch !== null && epoch === sub.epoch) {
        if (sub.offset !== null && offset <= sub.offset) return false; // seen already
      } else if (sub.epoch !== null && epoch !== null) {
        // The channel's history was lost (e.g. Redis was flushed): a new stream.
        this._recoveryFailed(sub, 'epoch', epoch, offset - 1);
      }
      sub.epoch = epoch;
      sub.offset = offset;
      return true;
    }

    _subscribed(sub, result, resuming, transport) {
      const epoch = result.epoch != null ? String(result.epoch) : null;
      const offset = toInt(result.offset);
      const before = { epoch: sub.epoch, offset: sub.offset };
      // WebSocket: `recovered` is in the reply. Resumed: keep our position, the missed
      // publications follow; otherwise delivery starts after the reply's position.
      // SSE: unknown here (null); a `gap` event reports a failure.
      const recovered = transport === 'websocket' && resuming ? result.recovered === true : null;
      if (transport === 'websocket' && !recovered) {
        sub.epoch = epoch;
        sub.offset = offset;
      }
      const first = !sub._everSubscribed;
      sub._everSubscribed = true;
      sub.state = 'subscribed';
      sub.recovered = recovered;
      const info = { channel: sub.channel, epoch: sub.epoch, offset: sub.offset, recovered, resubscribed: !first, transport };
      sub._emit('subscribed', info);
      this._emit('subscribed', info);
      if (recovered === false) {
        const ev = {
          channel: sub.channel,
          reason: before.epoch !== epoch ? 'epoch' : 'history',
          lastEpoch: before.epoch,
          lastOffset: before.offset,
          epoch,
          offset,
        };
        sub._emit('recoveryFailed', ev);
        this._emit('recoveryFailed', ev);
      }
      if (first) sub._resolve(sub);
    }

    _recoveryFailed(sub, reason, epoch, offset) {
      const ev = { channel: sub.channel, reason, lastEpoch: sub.epoch, lastOffset: sub.offset, epoch, offset };
      sub.recovered = false;
      sub.epoch = epoch;
      sub.offset = offset;
      sub._emit('recoveryFailed', ev);
      this._emit('recoveryFailed', ev);
    }

    // -------------------------------------------------------------- SSE

    async _openSse(token, seq) {
      this._closeEs();
      const subs = Array.from(this._subs.values());
      if (!subs.length) {
        this._connected('sse'); // nothing to stream; the HTTP API works
        return;
      }
      // A channel without a position starts at the current top of its history, so that
      // nothing published between now and the stream opening is missed.
      await Promise.all(
        subs
          .filter((s) => s.position === null)
          .map(async (s) => {
            try {
              const page = await this._http('GET', '/api/channels/' + encodeURIComponent(s.channel) + '/history?limit=0', null, token);
              if (s.position === null && page && EPOCH_RE.test(String(page.epoch)) && toInt(page.offset) !== null) {
                s.epoch = String(page.epoch);
                s.offset = toInt(page.offset);
              }
            } catch (err) {
              /* the stream starts it live */
            }
          })
      );
      if (seq !== this._seq || !this._active) return;
      // A request above had the token refused and got a new one: the stream takes that.
      if (token && this._token !== token && !this._tokenRejected) token = this._token;
      const ES = this._eventSourceClass();
      if (!ES) {
        const err = new GatewayError('unavailable', 'neither WebSocket nor EventSource is available');
        return this._stop('unavailable', { transport: 'sse' }, err);
      }
      const q = new URLSearchParams();
      for (const s of subs) q.append('channel', s.channel);
      if (token) q.set('token', token);
      const cursor = subs
        .filter((s) => s.position !== null && EPOCH_RE.test(s.epoch))
        .map((s) => s.channel + '~' + s.epoch + '~' + s.offset)
        .join(',');
      if (cursor) q.set('last_event_id', cursor);
      const resuming = new Map(subs.map((s) => [s.channel, s._everSubscribed || s.position !== null]));
      let es;
      try {
        const url = this._urls.http + '/sse?' + q.toString();
        es =
          ES === FetchEventSource
            ? new FetchEventSource(url, {
                fetch: this.options.fetch,
                stallTimeout: this.options.sseStallTimeout,
                openTimeout: this.options.commandTimeout,
              })
            : new ES(url);
      } catch (err) {
        this._retry({ transport: 'sse', reason: String(err && err.message) });
        return;
      }
      this._es = es;
      let opened = false;
      es.onopen = () => {
        if (this._es !== es) return;
        opened = true;
        for (const s of subs) {
          if (this._subs.get(s.channel) !== s) continue;
          if (s.state !== 'subscribed') {
            this._subscribed(s, { epoch: s.epoch, offset: s.offset }, resuming.get(s.channel), 'sse');
          }
        }
        this._connected('sse');
        // Subscribed while this stream was opening: a new stream with every channel.
        if (Array.from(this._subs.values()).some((s) => !subs.includes(s))) this._queueSseReopen();
      };
      es.onmessage = (ev) => {
        if (this._es !== es) return;
        let msg;
        try {
          msg = JSON.parse(ev.data);
        } catch (err) {
          return;
        }
        if (msg && typeof msg === 'object') this._push(msg);
      };
      const presence = (ev) => {
        if (this._es !== es) return;
        try {
          this._push(JSON.parse(ev.data));
        } catch (err) {
          /* ignore */
        }
      };
      es.addEventListener('join', presence);
      es.addEventListener('leave', presence);
      es.addEventListener('gap', (ev) => {
        if (this._es !== es) return;
        let channel = null;
        try {
          channel = JSON.parse(ev.data).channel;
        } catch (err) {
          return;
        }
        const sub = this._subs.get(channel);
        if (!sub) return;
        const pos = parseCursor(ev.lastEventId)[channel] || { epoch: null, offset: null };
        this._recoveryFailed(sub, pos.epoch !== sub.epoch ? 'epoch' : 'history', pos.epoch, pos.offset);
      });
      es.onerror = (ev) => {
        if (this._es !== es) return;
        for (const s of this._subs.values()) if (s.state === 'subscribed') s.state = 'pending';
        if (es.readyState === ES_CLOSED) {
          // Refused (401 after expiry, 503 while draining…), ended or gone silent:
          // reopen ourselves, with a fresh token if needed and our own positions as
          // the cursor.
          this._es = null;
          this._sseClosed(es, opened, ev || {});
        } else if (this.state === 'connected') {
          // The browser reconnects by itself and sends Last-Event-ID.
          this.transport = null;
          this._setState('reconnecting', { transport: 'sse' });
        }
      };
    }

    /** What reads the stream: the `EventSource` option, else fetch() where it streams,
     * else the browser's EventSource (null: neither). */
    _eventSourceClass() {
      if (this.options.EventSource) return this.options.EventSource;
      if (FetchEventSource.supported(this.options.fetch)) return FetchEventSource;
      return typeof EventSource !== 'undefined' ? EventSource : null;
    }

    /** A stream ended CLOSED: `ev` says why where fetch() read it ({status, code, reason}). */
    _sseClosed(es, opened, ev) {
      const info = { transport: 'sse', reason: (opened ? 'stream closed' : 'stream refused') + (ev.reason ? ': ' + ev.reason : '') };
      if (ev.status) info.status = ev.status;
      if (ev.status === 401) {
        // As a WebSocket's 4001: a new token, if there is a way to get one.
        this._tokenRejected = true;
        if (typeof this.options.getToken !== 'function' || this.options.tokenless) {
          const err = new GatewayError('unauthorized', 'the gateway refused the ' + (this.options.tokenless ? 'stream' : 'token') + ' (' + (ev.reason || 401) + ')');
          return this._stop('unauthorized', info, err);
        }
        return this._retry(info, jitter(500));
      }
      if (ev.status === 400 || ev.status === 403) {
        // A channel refused (name or permission): say so; a new token may allow it.
        this._emit('error', new GatewayError(ev.code || HTTP_CODES[ev.status], ev.reason || 'HTTP ' + ev.status, { status: ev.status }));
      }
      // An open stream that ended (a drain, the token's expiry) comes back after the
      // gateway's `retry:`, spread; everything else with the backoff.
      this._retry(info, opened && es.retry != null && !ev.status ? jitter(es.retry) : undefined);
    }

    _queueSseReopen() {
      if (this._sseReopenQueued) return;
      this._sseReopenQueued = true;
      Promise.resolve().then(() => {
        this._sseReopenQueued = false;
        if (!this._active || this._mode !== 'sse' || this.state !== 'connected') return;
        // Same connection state: a new stream for the new set of channels, resuming the
        // others from their positions.
        const seq = ++this._seq;
        this._currentToken().then(
          (token) => {
            if (seq === this._seq && this._active) this._openSse(token, seq);
          },
          (err) => this._emit('error', err)
        );
      });
    }

    _closeEs() {
      const es = this._es;
      if (!es) return;
      this._es = null;
      es.onopen = es.onmessage = es.onerror = null;
      es.close();
    }

    // -------------------------------------------------------------- HTTP API

    _fetch() {
      const f = this.options.fetch || (typeof fetch !== 'undefined' ? fetch : null);
      if (!f) throw new GatewayError('unavailable', 'no fetch() in this runtime');
      return f;
    }

    async _http(method, path, body, token, retried) {
      const f = this._fetch();
      const tok = token || (await this._currentToken());
      const init = { method, headers: tok ? { Authorization: 'Bearer ' + tok } : {}, cache: 'no-store' };
      if (body != null) {
        init.headers['Content-Type'] = 'application/json';
        init.body = JSON.stringify(body);
      }
      let res;
      try {
        res = await f.call(typeof globalThis !== 'undefined' ? globalThis : undefined, this._urls.http + path, init);
      } catch (err) {
        throw new GatewayError('disconnected', 'request failed: ' + (err && err.message));
      }
      let json = null;
      try {
        json = await res.json();
      } catch (err) {
        json = null;
      }
      if (!res.ok) {
        const e = (json && json.error) || {};
        if (res.status === 401 && !retried && typeof this.options.getToken === 'function') {
          this._tokenRejected = true;
          return this._http(method, path, body, null, true);
        }
        throw new GatewayError(e.code || HTTP_CODES[res.status] || 'error', e.message || 'HTTP ' + res.status, { status: res.status });
      }
      return json || {};
    }
  }

  GatewayClient.GatewayError = GatewayError;
  GatewayClient.Subscription = Subscription;
  GatewayClient.tokenExpiry = tokenExpiry;
  GatewayClient.FetchEventSource = FetchEventSource;
  GatewayClient.version = VERSION;
  return GatewayClient;
})();

if (typeof module === 'object' && module && module.exports) module.exports = GatewayClient;
