// Baseline: Node socket.io 4 (WebSocket transport only), one room per channel.
//
// Clients emit "subscribe" with a channel name, join the room of that name and get
// "subscribed" back once the channel's Redis subscription is live; the payload published
// on a channel goes to its room as "pub", as for the tool's other plain baselines.
//
//   node server.js --port 8006 --redis-url redis://127.0.0.1:6379/0 [--host 127.0.0.1]
"use strict";

const http = require("http");
const { Server } = require("socket.io");
const { createClient } = require("redis");

function option(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at >= 0 && at + 1 < process.argv.length ? process.argv[at + 1] : fallback;
}

async function main() {
  const port = Number(option("port", "8006"));
  const host = option("host", "127.0.0.1");
  const redisUrl = option("redis-url", "redis://127.0.0.1:6379/0");

  const server = http.createServer((req, res) => {
    res.statusCode = req.url === "/healthz" ? 200 : 404;
    res.end(res.statusCode === 200 ? "ok" : "");
  });
  const io = new Server(server, { transports: ["websocket"], serveClient: false });
  const redis = createClient({ url: redisUrl });
  redis.on("error", (err) => console.error("redis:", err.message));
  await redis.connect();
  // One Redis subscription per channel, made by its first subscriber: the Redis may be
  // shared with other servers publishing on other channels.
  const subscribed = new Map();
  const relay = (message, channel) => {
    let payload;
    try {
      payload = JSON.parse(message);
    } catch {
      return; // not a publication of the tool's
    }
    io.to(channel).emit("pub", payload);
  };
  io.on("connection", (socket) => {
    socket.on("subscribe", async (channel) => {
      if (typeof channel !== "string") return;
      if (!subscribed.has(channel)) subscribed.set(channel, redis.subscribe(channel, relay));
      await subscribed.get(channel);
      socket.join(channel);
      socket.emit("subscribed", channel);
    });
  });

  server.listen(port, host);
  const stop = () => {
    io.close();
    redis.quit().finally(() => process.exit(0));
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
