// Types of ringcast-client (src/index.js). The wire protocol is protocol/PROTOCOL.md.

/** Connection options; every time is in milliseconds. */
export interface ConnectionOptions {
  /** Backoff floor: the first retry waits a random time in [0, backoffMinMs). Default 250. */
  backoffMinMs?: number;
  /** Backoff ceiling: retry n waits a random time in [0, min(max, min * 2^n)). Default 30000. */
  backoffMaxMs?: number;
  /** A connection open this long resets the backoff. Default 10000. */
  stableAfterMs?: number;
  /** After close 1012 or a `shutdown` notice, reconnect after a random delay up to this. Default 5000. */
  restartJitterMs?: number;
  /** Close and replace a connection that has received nothing for this long; 0: never. Default 30000. */
  livenessTimeoutMs?: number;
  /** Give up an attempt that has not opened in this long. Default 10000. */
  connectTimeoutMs?: number;
  /** Consecutive attempts that never open after which the client stops. Default Infinity. */
  maxAttempts?: number;
  /**
   * A token (JWT), or a function returning one, called before every attempt; `refresh` is true
   * after the server closed with 1008 "token expired". Sent as the subprotocol entry
   * `ringcast.token.<JWT>`.
   */
  token?: string | ((info: { refresh: boolean }) => string | null | Promise<string | null>);
  /** The WebSocket constructor; default the global one (in Node, pass e.g. the ws package's). */
  WebSocket?: unknown;
  /** The dialect: "json" (`ringcast.v1.json`, the default) or "binary" (`ringcast.v2.bin`). */
  encoding?: "json" | "binary";
  /** Uniform random numbers in [0, 1), for the jitter. Default Math.random. */
  random?: () => number;
}

export interface ClientOptions extends ConnectionOptions {
  /** Publishes held while disconnected; one more fails with `queue_full`; 0 fails at once with `disconnected`. Default 1000. */
  maxQueuedPublishes?: number;
  /** Connect at once. Default true. */
  autoStart?: boolean;
}

export interface SharedOptions extends ClientOptions {
  /** Share one socket across the tabs of this origin (Web Locks + BroadcastChannel). Default false. */
  shared?: boolean;
  /** Tabs with the same name share a socket. Default the URL. */
  sharedName?: string;
  /** How long a new leader tab collects the other tabs' positions before subscribing. Default 150. */
  collectMs?: number;
}

export interface CloseEvent {
  code: number;
  reason: string;
  willReconnect: boolean;
  /** The delay before the next attempt (null when none, or in a follower tab). */
  delayMs: number | null;
}

export interface MessageEvent<T = unknown> {
  topic: string;
  seq: number;
  /** The JSON value published, or the bytes of a binary payload. */
  data: T | Uint8Array;
}

export interface DroppedEvent {
  topic: string;
  /** Messages lost. */
  count: number;
  /** The seq of the message that follows. */
  next: number;
  /** True when the client found the hole itself (the server announced none). */
  synthesized?: boolean;
}

export interface ResetEvent {
  topic: string;
  /** Delivery continues at this seq of `epoch`; everything the client held is from another numbering. */
  oldest: number;
  epoch: number;
}

export interface ResubscribedEvent {
  topic: string;
  /** The seq the subscription resumed after (null: it started fresh). */
  since: number | null;
}

/** A request that failed: a broker error code, or `disconnected`, `queue_full`, `closed`. */
export class RingcastError extends Error {
  code: string;
  retryAfterMs?: number;
}

export class Subscription {
  readonly topic: string;
  active: boolean;
  /** Resolves at the first ack; rejects when the broker refuses the subscription. */
  readonly ready: Promise<{ epoch: number | null; seq: number | null }>;
  /** The last seq delivered. */
  readonly seq: number | null;
  /** The epoch `seq` counts in. */
  readonly epoch: number | null;
  on<T = unknown>(event: "message", fn: (e: MessageEvent<T>) => void): () => void;
  on(event: "dropped", fn: (e: DroppedEvent) => void): () => void;
  on(event: "reset", fn: (e: ResetEvent) => void): () => void;
  on(event: "subscribed", fn: (e: { topic: string; epoch: number | null; seq: number | null }) => void): () => void;
  on(event: "resubscribed", fn: (e: ResubscribedEvent) => void): () => void;
  on(event: "error", fn: (e: RingcastError) => void): () => void;
  off(event: string, fn: (e: any) => void): void;
  unsubscribe(): void;
}

/** The client API, over a socket of its own or shared across tabs. */
export interface Client {
  readonly connected: boolean;
  subscribe(topic: string, options?: { since?: number; epoch?: number }): Subscription;
  /** Resolves with the ack's seq and epoch; rejects with a RingcastError. */
  publish(topic: string, data: unknown): Promise<{ seq: number; epoch: number }>;
  close(): void;
  on(event: "open", fn: (e: { attempt?: number }) => void): () => void;
  on(event: "close", fn: (e: CloseEvent) => void): () => void;
  on(event: "shutdown", fn: (e: { reason: string }) => void): () => void;
  on(event: "error", fn: (e: { message: string }) => void): () => void;
  on(event: "stopped", fn: (e: { reason: string }) => void): () => void;
  off(event: string, fn: (e: any) => void): void;
}

export class RingcastClient implements Client {
  constructor(url: string, options?: ClientOptions);
  readonly connected: boolean;
  start(): void;
  subscribe(topic: string, options?: { since?: number; epoch?: number }): Subscription;
  publish(topic: string, data: unknown): Promise<{ seq: number; epoch: number }>;
  close(): void;
  on(event: string, fn: (e: any) => void): () => void;
  off(event: string, fn: (e: any) => void): void;
}

export class SharedClient implements Client {
  /** Whether this tab holds the socket. */
  readonly isLeader: boolean;
  readonly connected: boolean;
  subscribe(topic: string, options?: { since?: number; epoch?: number }): Subscription;
  publish(topic: string, data: unknown): Promise<{ seq: number; epoch: number }>;
  close(): void;
  on(event: string, fn: (e: any) => void): () => void;
  off(event: string, fn: (e: any) => void): void;
}

/** A shared client when `options.shared` and the browser has Web Locks and BroadcastChannel, else a RingcastClient. */
export function createClient(url: string, options?: SharedOptions): RingcastClient | SharedClient;

/** Full jitter: a random delay in [0, min(backoffMaxMs, backoffMinMs * 2^attempt)). */
export function backoffDelay(
  attempt: number,
  opts: { backoffMinMs: number; backoffMaxMs: number },
  random?: () => number,
): number;

/** What the client does after a close code. */
export function closePolicy(
  code: number,
  reason: string,
  shutdownNotice?: boolean,
): { action: "reconnect"; delay: "backoff" | "restart" | "now"; refreshToken: boolean };

export const JSON_PROTOCOL: "ringcast.v1.json";
export const BINARY_PROTOCOL: "ringcast.v2.bin";

/** A dialect: request objects to frames, frames to event objects (a binary payload as `bytes`). */
export interface Codec {
  readonly protocol: string;
  encode(request: object): string | Uint8Array;
  decode(frame: string | ArrayBuffer | Uint8Array): Record<string, unknown>;
}
export const jsonCodec: Codec;
export const binaryCodec: Codec;
export const DEFAULTS: Readonly<Required<Omit<ConnectionOptions, "token" | "WebSocket" | "random">>>;
export const CloseCode: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  POLICY: 1008;
  SERVICE_RESTART: 1012;
  LIVENESS_TIMEOUT: 4000;
}>;
