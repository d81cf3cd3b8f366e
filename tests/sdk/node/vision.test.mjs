// Vision requests written as OpenAI's documentation writes them, through an
// upstream that takes only inlined images (`inline_images`, `strip_detail`,
// JPEG/PNG/WebP). The mock answers with the body it received (`x-mock-echo`),
// so each test checks what reached the upstream.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';

import OpenAI from 'openai';

import { IMAGES, startImageHost, useIris } from './harness.mjs';

const env = useIris({
  models: [{ name: 'vision-model' }],
  clients: [{ name: 'vision', key: 'iris-sdk-vision-key' }],
  upstreamToml: ['inline_images = true', 'strip_detail = true', 'image_formats = ["jpeg", "png", "webp"]'].join('\n'),
  // The test image host is on loopback, refused unless allowed.
  extraToml: '[images]\nallowed_networks = ["127.0.0.2/32"]',
});
let images;
before(async () => {
  images = await startImageHost();
});
after(() => images?.stop());

const echo = { headers: { 'x-mock-echo': '1' } };
const fileBytes = (name) => readFileSync(join(IMAGES, name));

// As in OpenAI's "Images and vision" guide.
function encodeImage(imagePath) {
  return readFileSync(imagePath, 'base64');
}

function askAbout(imageURL, body = {}, options = {}) {
  return env.client().chat.completions.create(
    {
      model: 'vision-model',
      messages: [
        {
          role: 'user',
          content: [
            { type: 'text', text: "What's in this image?" },
            { type: 'image_url', image_url: imageURL },
          ],
        },
      ],
      ...body,
    },
    options,
  );
}

/** The request body the upstream received, from the mock's echo. */
const forwarded = (completion) => JSON.parse(completion.choices[0].message.content);

/** The `image_url` part the upstream received. */
function forwardedImage(completion) {
  const content = forwarded(completion).messages[0].content;
  assert.deepEqual(content[0], { type: 'text', text: "What's in this image?" });
  assert.equal(content[1].type, 'image_url');
  return content[1].image_url;
}

function splitDataURI(uri) {
  const match = uri.match(/^data:([^;,]+);base64,([A-Za-z0-9+/]*={0,2})$/);
  assert.ok(match, `not a base64 data URI: ${uri.slice(0, 80)}`);
  return { mime: match[1], data: Buffer.from(match[2], 'base64') };
}

/** Width and height from a PNG's IHDR or a JPEG's frame header. */
function pixelSize(image) {
  if (image.subarray(0, 8).equals(Buffer.from('\x89PNG\r\n\x1a\n', 'latin1'))) {
    return [image.readUInt32BE(16), image.readUInt32BE(20)];
  }
  assert.ok(image[0] === 0xff && image[1] === 0xd8, 'neither PNG nor JPEG');
  for (let at = 2; at + 9 < image.length; at += 2 + image.readUInt16BE(at + 2)) {
    if ([0xc0, 0xc1, 0xc2].includes(image[at + 1])) {
      return [image.readUInt16BE(at + 7), image.readUInt16BE(at + 5)]; // stored height first
    }
  }
  assert.fail('no JPEG frame header');
}

test('a remote PNG reaches the upstream inlined byte for byte', async () => {
  const completion = await askAbout({ url: images.url('cat.png'), detail: 'high' }, { max_tokens: 50 }, echo);

  const imageURL = forwardedImage(completion);
  const { mime, data } = splitDataURI(imageURL.url);
  assert.equal(mime, 'image/png');
  assert.ok(data.equals(fileBytes('cat.png')), 'the served bytes, unchanged');
  assert.ok(!('detail' in imageURL), 'strip_detail');
  assert.ok(images.paths.includes('/cat.png'));
  // Fields Iris does not rewrite pass through.
  assert.equal(forwarded(completion).max_tokens, 50);
});

test('a remote GIF is converted to an accepted format', async () => {
  const completion = await askAbout({ url: images.url('cat.gif') }, {}, echo);

  const { mime, data } = splitDataURI(forwardedImage(completion).url);
  assert.ok(['image/png', 'image/jpeg'].includes(mime), mime);
  // The MIME type says what the bytes are.
  assert.equal(data[0], mime === 'image/png' ? 0x89 : 0xff);
  assert.deepEqual(pixelSize(data), [40, 24]); // as cat.gif
});

test('a local file sent as base64 reaches the upstream unchanged', async () => {
  const base64Image = encodeImage(join(IMAGES, 'cat.jpg'));

  const completion = await askAbout({ url: `data:image/jpeg;base64,${base64Image}` }, {}, echo);

  assert.equal(completion.choices[0].finish_reason, 'stop');
  const { mime, data } = splitDataURI(forwardedImage(completion).url);
  assert.equal(mime, 'image/jpeg');
  assert.ok(data.equals(fileBytes('cat.jpg')));
  assert.deepEqual(pixelSize(data), [40, 24]);
});

test('a PNG labelled image/jpeg, as the guide writes it, is relabelled', async () => {
  // The guide hard-codes `data:image/jpeg` whatever the file is; the upstream
  // gets the type the bytes say.
  const base64Image = encodeImage(join(IMAGES, 'cat.png'));

  const completion = await askAbout({ url: `data:image/jpeg;base64,${base64Image}` }, {}, echo);

  const { mime, data } = splitDataURI(forwardedImage(completion).url);
  assert.equal(mime, 'image/png');
  assert.ok(data.equals(fileBytes('cat.png')));
});

test('a loopback URL outside allowed_networks is a BadRequestError', async () => {
  const before = await env.upstream.chatRequests();

  await assert.rejects(askAbout({ url: 'http://127.0.0.1:1/x.png' }), (error) => {
    assert.ok(error instanceof OpenAI.BadRequestError, `got ${error.constructor.name}: ${error.message}`);
    assert.equal(error.status, 400);
    assert.equal(error.code, 'image_url_forbidden');
    assert.equal(error.param, 'messages[0].content[1].image_url.url');
    return true;
  });
  assert.equal(await env.upstream.chatRequests(), before, 'nothing went upstream');
});
