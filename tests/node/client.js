// A stitch.v1 client that knows only proto/stitch/v1/cascade.proto and proto/stitch/v1/LAYOUT.md.
//
//   node client.js --vectors layout_vectors.json
//       checks this file's tiling, fingerprint and top-R count against every test vector
//   node client.js --address HOST:PORT --proto cascade.proto --checkpoint DIR --image FILE.png \
//       --prompt TEXT [--max-new-tokens N] [--retention R]
//       reads the image size from the PNG header and the tiling from the checkpoint's JSON files
//       (LAYOUT.md section 1), computes layout, |V| and fingerprint, sends one PLAIN-encoded
//       AnswerRequest keeping the top R of the visual tokens by index order (all of them at
//       R = 1), and prints one JSON object: what it computed and what the server answered.
// STITCH_AUTH_TOKEN, when set, is sent as "authorization: Bearer <token>".
// Exit codes: 0 done, 1 a vector mismatch or a failed call, 2 bad arguments.
"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");

const FINGERPRINT_VERSION = "stitch-layout-v2";
const CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD = [0.26862954, 0.26130258, 0.27577711];

// ---------------------------------------------------------------- LAYOUT.md section 2: tiling

function candidateGrids(minTiles, maxTiles) {
  const grids = [];
  for (let columns = 1; columns <= maxTiles; columns++) {
    for (let rows = 1; rows <= maxTiles; rows++) {
      const tiles = columns * rows;
      if (tiles >= minTiles && tiles <= maxTiles) grids.push([columns, rows]);
    }
  }
  // Array.prototype.sort is stable (ES2019): equal tile counts keep the loop order.
  return grids.sort((a, b) => a[0] * a[1] - b[0] * b[1]);
}

function chooseGrid(width, height, tiling) {
  const aspect = width / height;
  const area = width * height;
  let bestDiff = Infinity;
  let best = [1, 1];
  for (const [columns, rows] of candidateGrids(tiling.min_tiles, tiling.max_tiles)) {
    const diff = Math.abs(aspect - columns / rows);
    if (diff < bestDiff) {
      bestDiff = diff;
      best = [columns, rows];
    } else if (diff === bestDiff && area > 0.5 * tiling.tile_size * tiling.tile_size * columns * rows) {
      best = [columns, rows];
    }
  }
  return best;
}

function computeLayout(width, height, tiling) {
  const [columns, rows] = chooseGrid(width, height, tiling);
  const thumbnail = tiling.use_thumbnail && columns * rows > 1;
  const numTiles = columns * rows + (thumbnail ? 1 : 0);
  return {
    tile_size: tiling.tile_size,
    grid_columns: columns,
    grid_rows: rows,
    thumbnail,
    tokens_per_tile: tiling.tokens_per_tile,
    num_tiles: numTiles,
    num_visual_tokens: numTiles * tiling.tokens_per_tile,
  };
}

// ---------------------------------------------------------------- LAYOUT.md section 3: fingerprint

function float64Hex(value) {
  const bytes = Buffer.alloc(8);
  bytes.writeDoubleBE(value);
  return bytes.toString("hex");
}

function fingerprintInput(layout, tiling) {
  return [
    FINGERPRINT_VERSION,
    `tile=${layout.tile_size}`,
    `grid=${layout.grid_columns}x${layout.grid_rows}`,
    `thumb=${layout.thumbnail ? 1 : 0}`,
    `tpt=${layout.tokens_per_tile}`,
    "mean=" + tiling.image_mean.map(float64Hex).join(","),
    "std=" + tiling.image_std.map(float64Hex).join(","),
  ].join("|");
}

function fingerprint(layout, tiling) {
  const digest = crypto.createHash("sha256").update(Buffer.from(fingerprintInput(layout, tiling), "ascii")).digest();
  return digest.readBigUInt64BE(0); // unsigned 64-bit, big-endian
}

// ---------------------------------------------------------------- LAYOUT.md section 4: top-R count

function keepCount(retention, numVisualTokens) {
  return Math.max(1, Math.floor(retention * numVisualTokens));
}

// ---------------------------------------------------------------- LAYOUT.md section 1: inputs

function tilingFromCheckpoint(directory) {
  const read = (name) => JSON.parse(fs.readFileSync(path.join(directory, name), "utf8"));
  const preprocessor = read("preprocessor_config.json");
  const image = preprocessor.image_processor || preprocessor;
  const config = read("config.json");
  const side = (value) => (Array.isArray(value) ? value[0] : typeof value === "object" ? value.height : value);
  const tileSize = side(image.size);
  let maxTiles = image.max_patches ?? 12;
  let minTiles = image.min_patches ?? 1;
  if (maxTiles <= 1) minTiles = maxTiles = 1;
  const vision = config.vision_config;
  const perSide = (tileSize / side(vision.patch_size)) * (config.downsample_ratio ?? 0.5);
  return {
    tile_size: tileSize,
    min_tiles: minTiles,
    max_tiles: maxTiles,
    use_thumbnail: true,
    tokens_per_tile: perSide * perSide,
    image_mean: image.image_mean ?? CLIP_MEAN,
    image_std: image.image_std ?? CLIP_STD,
  };
}

function pngSize(bytes) {
  const signature = "89504e470d0a1a0a";
  if (bytes.subarray(0, 8).toString("hex") !== signature || bytes.toString("ascii", 12, 16) !== "IHDR") {
    throw new Error("not a PNG file");
  }
  return { width: bytes.readUInt32BE(16), height: bytes.readUInt32BE(20) };
}

// ---------------------------------------------------------------- modes

function checkVectors(file) {
  const vectors = JSON.parse(fs.readFileSync(file, "utf8"));
  const failures = [];
  for (const v of vectors.layouts) {
    const layout = computeLayout(v.width, v.height, v.tiling);
    const got = {
      grid_columns: layout.grid_columns,
      grid_rows: layout.grid_rows,
      thumbnail: layout.thumbnail,
      num_tiles: layout.num_tiles,
      num_visual_tokens: layout.num_visual_tokens,
      fingerprint_input: fingerprintInput(layout, v.tiling),
      fingerprint_hex: fingerprint(layout, v.tiling).toString(16).padStart(16, "0"),
      fingerprint_decimal: fingerprint(layout, v.tiling).toString(),
    };
    for (const [key, value] of Object.entries(got)) {
      if (value !== v[key]) failures.push(`${v.name}: ${key} ${JSON.stringify(value)} != ${JSON.stringify(v[key])}`);
    }
  }
  for (const c of vectors.keep_counts) {
    const got = keepCount(c.retention, c.num_visual_tokens);
    if (got !== c.count) failures.push(`keep_count(${c.retention}, ${c.num_visual_tokens}) ${got} != ${c.count}`);
  }
  return { layouts: vectors.layouts.length, keep_counts: vectors.keep_counts.length, failures };
}

function ask(options) {
  const grpc = require("@grpc/grpc-js");
  const protoLoader = require("@grpc/proto-loader");
  // longs: String -> 64-bit fields travel as decimal strings, never as lossy JS numbers.
  const definition = protoLoader.loadSync(options.proto, { keepCase: true, longs: String, enums: String, defaults: true });
  const stitch = grpc.loadPackageDefinition(definition).stitch.v1;

  const image = fs.readFileSync(options.image);
  const { width, height } = pngSize(image);
  const tiling = tilingFromCheckpoint(options.checkpoint);
  const layout = computeLayout(width, height, tiling);
  const print = fingerprint(layout, tiling);
  const count = keepCount(options.retention, layout.num_visual_tokens);
  const indices = Array.from({ length: count }, (_, i) => i);
  const request = {
    request_id: "node-client",
    image,
    image_mime_type: "image/png",
    prompt: options.prompt,
    num_visual_tokens: layout.num_visual_tokens,
    retention: options.retention,
    kept: { encoding: "PLAIN", count, indices },
    layout: {
      tile_size: layout.tile_size,
      grid_columns: layout.grid_columns,
      grid_rows: layout.grid_rows,
      thumbnail: layout.thumbnail,
      tokens_per_tile: layout.tokens_per_tile,
      fingerprint: print.toString(),
    },
    generation: { max_new_tokens: options.maxNewTokens },
  };
  const metadata = new grpc.Metadata();
  if (process.env.STITCH_AUTH_TOKEN) metadata.add("authorization", `Bearer ${process.env.STITCH_AUTH_TOKEN}`);
  const client = new stitch.Cascade(options.address, grpc.credentials.createInsecure());
  const computed = { width, height, tiling, layout, fingerprint_decimal: print.toString(), kept: count };
  return new Promise((resolve) => {
    client.Answer(request, metadata, { deadline: Date.now() + 60_000 }, (error, reply) => {
      client.close();
      if (error) resolve({ computed, error: { code: grpc.status[error.code], details: error.details } });
      else resolve({ computed, reply });
    });
  });
}

function parseArgs(argv) {
  const options = { retention: 1.0, maxNewTokens: 8 };
  const names = {
    "--vectors": "vectors", "--address": "address", "--proto": "proto", "--checkpoint": "checkpoint",
    "--image": "image", "--prompt": "prompt", "--max-new-tokens": "maxNewTokens", "--retention": "retention",
  };
  for (let i = 0; i < argv.length; i += 2) {
    const name = names[argv[i]];
    if (!name || i + 1 >= argv.length) throw new Error(`bad argument ${argv[i]}`);
    options[name] = ["maxNewTokens", "retention"].includes(name) ? Number(argv[i + 1]) : argv[i + 1];
  }
  return options;
}

async function main() {
  let options;
  try {
    options = parseArgs(process.argv.slice(2));
  } catch (error) {
    console.error(`client.js: ${error.message}`);
    return 2;
  }
  const out = {};
  if (options.vectors) out.vectors = checkVectors(options.vectors);
  if (options.address) out.answer = await ask(options);
  console.log(JSON.stringify(out));
  const failed = (out.vectors && out.vectors.failures.length > 0) || (out.answer && out.answer.error);
  return failed ? 1 : 0;
}

main().then((code) => process.exit(code));
