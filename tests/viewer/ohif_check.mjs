// Drives OHIF in headless Chromium (puppeteer-core, Debian's chromium with SwiftShader
// WebGL) as a radiologist would, for tests/test_viewer_ohif.py:
//   1. open the study; 2. double-click the SEG, answer "Yes", go to the slice at
//   `slicePosition` and screenshot it, with where three patient points land on screen;
//   3. open the overlay series and screenshot it; 4. open the SR and screenshot it, with
//   the page's text; 5. double-click the RTSTRUCT, answer "Yes", go to the same slice,
//   screenshot it with the contours and again with them hidden (the difference is what
//   the RTSTRUCT drew), with its ROIs as OHIF lists them; every console error throughout.
// Usage: node ohif_check.mjs '<json: {url, outDir, puppeteer, chromium, slicePosition, points,
//   segDescription, overlayDescription, srDescription, rtDescription}>'
// Prints one JSON line (the findings); the pixel checks are made in Python.
const args = JSON.parse(process.argv[2]);
// `steps` (optional): which of 'seg', 'overlay', 'sr', 'rtstruct' to take (default all)
const steps = args.steps || ['seg', 'overlay', 'sr', 'rtstruct'];
const { default: puppeteer } = await import(args.puppeteer);
const sleep = ms => new Promise(r => setTimeout(r, ms));
const errors = [];
let phase = 'open';
const out = { phases: {} };
const t0 = Date.now();
const mark = name => { out.phases[name] = (Date.now() - t0) / 1000; };

async function waitFor(page, what, fn, arg, timeoutMs = 60000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    let ok = false;
    try { ok = await page.evaluate(fn, arg); } catch (e) { ok = false; }
    if (ok) return ok;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(250);
  }
}

async function clickText(page, text) {
  return page.evaluate(t => {
    const el = [...document.querySelectorAll('button')].find(b => b.innerText.trim() === t);
    if (el) { el.click(); return true; }
    return false;
  }, text);
}

async function openSeries(page, modality, description) {
  // thumbnails with an image (CT, OT) and list items without (SEG, SR)
  const items = await page.$$('[data-cy="study-browser-thumbnail"], [data-cy="study-browser-thumbnail-no-image"]');
  for (const it of items) {
    const text = await it.evaluate(e => e.innerText);
    if (text.includes(modality) && text.includes(description)) {
      const box = await it.boundingBox();
      await page.mouse.click(box.x + box.width / 2, box.y + box.height / 2, { clickCount: 2 });
      return text.replace(/\n/g, ' | ');
    }
  }
  throw new Error(`no ${modality} series "${description}" in the study browser`);
}

// go to the slice through `target` in the viewport that shows `segmentationId` (any
// segmentation when null), whatever the viewport type; returns where it went
async function goToSlice(page, segmentationId, target) {
  const nav = await page.evaluate((segId, target) => {
    const cs = window.cornerstone;
    const s = window.services.segmentationService;
    const ee = cs.getEnabledElements().find(e => s.getSegmentationRepresentations(e.viewport.id)
      .some(r => !segId || r.segmentationId === segId));
    const vp = ee.viewport;
    const ids = vp.getImageIds();
    let best = -1, dist = Infinity;
    ids.forEach((id, i) => {
      const p = cs.metaData.get('imagePlaneModule', id)?.imagePositionPatient;
      if (!p) return;
      const d = Math.hypot(p[0] - target[0], p[1] - target[1], p[2] - target[2]);
      if (d < dist) { dist = d; best = i; }
    });
    return { viewportId: vp.id, type: vp.type, best, dist, n: ids.length };
  }, segmentationId, target);
  // jump: the slice through the target position, whatever the viewport type
  await page.evaluate(async (vid, target) => {
    const cs = window.cornerstone;
    const vp = cs.getEnabledElements().find(e => e.viewport.id === vid).viewport;
    if (typeof vp.setImageIdIndex === 'function' && vp.type === 'stack') {
      const ids = vp.getImageIds();
      let best = 0, dist = Infinity;
      ids.forEach((id, i) => {
        const p = cs.metaData.get('imagePlaneModule', id).imagePositionPatient;
        const d = Math.hypot(p[0] - target[0], p[1] - target[1], p[2] - target[2]);
        if (d < dist) { dist = d; best = i; }
      });
      await vp.setImageIdIndex(best);
    } else {
      const cam = vp.getCamera();
      const n = cam.viewPlaneNormal, f = cam.focalPoint;
      const d = (target[0] - f[0]) * n[0] + (target[1] - f[1]) * n[1] + (target[2] - f[2]) * n[2];
      const shift = [n[0] * d, n[1] * d, n[2] * d];
      vp.setCamera({ focalPoint: [f[0] + shift[0], f[1] + shift[1], f[2] + shift[2]],
                     position: cam.position.map((v, i) => v + shift[i]) });
    }
    vp.render();
  }, nav.viewportId, target);
  await waitFor(page, 'the slice to be shown', ([vid, target]) => {
    const cs = window.cornerstone;
    const vp = cs.getEnabledElements().find(e => e.viewport.id === vid).viewport;
    const id = vp.getCurrentImageId?.();
    const p = id && cs.metaData.get('imagePlaneModule', id)?.imagePositionPatient;
    return p && Math.hypot(p[0] - target[0], p[1] - target[1], p[2] - target[2]) < 0.5;
  }, [nav.viewportId, target]);
  return nav;
}

// the viewport's canvas on the page and where the patient points `pts` land on it
async function viewGeometry(page, vid, pts) {
  return page.evaluate((vid, pts) => {
    const vp = window.cornerstone.getEnabledElements().find(e => e.viewport.id === vid).viewport;
    const rect = vp.canvas.getBoundingClientRect();
    return {
      rect: { x: rect.x, y: rect.y, width: rect.width, height: rect.height },
      canvas: pts.map(p => vp.worldToCanvas(p)),
      imageId: vp.getCurrentImageId?.() || null,
      focal: vp.getCamera().focalPoint,
    };
  }, vid, pts);
}

// after a wait on the state that matters, a short pause for the canvas to be drawn
async function settle(page, ms = 1500) {
  await page.evaluate(() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r))));
  await sleep(ms);
}

const browser = await puppeteer.launch({
  executablePath: args.chromium, headless: true,
  args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader',
         '--window-size=1400,900', '--disable-dev-shm-usage'],
});
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 1400, height: 900, deviceScaleFactor: 1 });
  page.on('console', m => { if (m.type() === 'error') errors.push({ phase, text: m.text().slice(0, 500) }); });
  page.on('pageerror', e => errors.push({ phase, text: 'page error: ' + e.message.slice(0, 500) }));

  await page.goto(args.url, { waitUntil: 'networkidle0', timeout: 120000 });
  await clickText(page, 'Skip all');  // the first-visit tour
  await waitFor(page, 'the CT in the viewport', () => {
    const ee = window.cornerstone?.getEnabledElements?.() || [];
    return ee.length > 0 && !!ee[0].viewport.getImageData?.();
  });
  mark('study_open');

  if (steps.includes('seg')) {
  // ---- SEG
  phase = 'seg';
  out.seg_item = await openSeries(page, 'SEG', args.segDescription);
  await waitFor(page, 'the "load the segmentation?" question', () =>
    [...document.querySelectorAll('button')].some(b => b.innerText.trim() === 'Yes'), null, 30000);
  await clickText(page, 'Yes');
  await waitFor(page, 'the segmentation in the viewport', () => {
    const s = window.services.segmentationService;
    const segs = s.getSegmentations();
    if (!segs.length) return false;
    const ee = window.cornerstone.getEnabledElements();
    return ee.some(e => s.getSegmentationRepresentations(e.viewport.id).length > 0);
  });
  // the SEG's segments (not those of an RTSTRUCT of the study, should OHIF load it too)
  out.segments = await page.evaluate(() => {
    const rt = window.services.displaySetService.getActiveDisplaySets()
      .filter(d => d.Modality === 'RTSTRUCT').map(d => d.displaySetInstanceUID);
    return window.services.segmentationService.getSegmentations()
      .filter(s => !rt.includes(s.segmentationId))
      .flatMap(s => Object.values(s.segments || {}).filter(Boolean).map(x => ({ label: x.label, color: x.color })));
  });
  const nav = await goToSlice(page, null, args.slicePosition);
  out.navigation = nav;
  await settle(page, 2000);
  const geo = await viewGeometry(page, nav.viewportId, args.points);
  out.seg_view = geo;
  await page.screenshot({ path: `${args.outDir}/ohif-seg.png` });
  mark('seg_loaded');

  }
  if (steps.includes('overlay')) {
  // ---- overlay series
  phase = 'overlay';
  out.overlay_item = await openSeries(page, 'OT', args.overlayDescription);
  await waitFor(page, 'the overlay series in the viewport', () =>
    window.cornerstone.getEnabledElements().some(e => {
      const id = e.viewport.getCurrentImageId?.();
      const m = id && window.cornerstone.metaData.get('generalSeriesModule', id);
      return m && m.modality === 'OT' && !!e.viewport.getImageData?.();
    }));
  await settle(page, 1500);
  out.overlay_rect = await page.evaluate(() => {
    const ee = window.cornerstone.getEnabledElements();
    return ee.map(e => { const r = e.viewport.canvas.getBoundingClientRect();
      return { x: r.x, y: r.y, width: r.width, height: r.height, modality: e.viewport.getImageIds?.()[0] || '' }; });
  });
  await page.screenshot({ path: `${args.outDir}/ohif-overlay.png` });
  mark('overlay_shown');

  }
  if (steps.includes('sr')) {
  // ---- SR
  phase = 'sr';
  out.sr_item = await openSeries(page, 'SR', args.srDescription);
  await waitFor(page, 'the SR measurement on screen', () => {
    if (/Volume: [\d.]+ mL/.test(document.body.innerText)) return true;
    // annotations are drawn on a render; ask for one while waiting
    window.cornerstone.getEnabledElements().forEach(e => e.viewport.render());
    return false;
  }, null, 90000).catch(e => { out.sr_wait = String(e); });
  await settle(page, 1500);
  // a measurement-tracking question may come first; the SR is read-only either way
  out.sr_buttons = await page.$$eval('button', els => els.map(e => e.innerText.trim()).filter(Boolean));
  out.sr_text = await page.evaluate(() => document.body.innerText);
  await page.screenshot({ path: `${args.outDir}/ohif-sr.png` });
  mark('sr_shown');

  }
  if (steps.includes('rtstruct')) {
  // ---- RTSTRUCT
  phase = 'rtstruct';
  out.rt_item = await openSeries(page, 'RTSTRUCT', args.rtDescription);
  await waitFor(page, 'the "load the RTSTRUCT?" question', () =>
    [...document.querySelectorAll('button')].some(b => b.innerText.trim() === 'Yes'), null, 60000);
  await clickText(page, 'Yes');
  // hydrated: the CT itself in the viewport (no more the RTSTRUCT's own), with its contours
  const rtId = await waitFor(page, 'the RTSTRUCT contours on the CT', () => {
    const rt = window.services.displaySetService.getActiveDisplaySets()
      .find(d => d.Modality === 'RTSTRUCT');
    if (!rt) return false;
    const grid = window.services.viewportGridService.getState();
    const shown = [...grid.viewports.values()].some(v =>
      (v.displaySetInstanceUIDs || []).includes(rt.displaySetInstanceUID));
    if (shown) return false;
    const s = window.services.segmentationService;
    return window.cornerstone.getEnabledElements().some(e =>
      s.getSegmentationRepresentations(e.viewport.id).some(r =>
        r.segmentationId === rt.displaySetInstanceUID && r.type === 'Contour'))
      && rt.displaySetInstanceUID;
  }, null, 90000);
  out.rt_segments = await page.evaluate(id => {
    const seg = window.services.segmentationService.getSegmentation(id);
    return Object.values(seg?.segments || {}).filter(Boolean).map(x => ({ label: x.label }));
  }, rtId);
  const rtNav = await goToSlice(page, rtId, args.slicePosition);
  out.rt_navigation = rtNav;
  // only the RTSTRUCT's contours on this viewport (the SEG may come back with the CT)
  out.rt_representations = await page.evaluate((vid, id) => {
    const s = window.services.segmentationService;
    const reps = s.getSegmentationRepresentations(vid);
    reps.filter(r => r.segmentationId !== id)
      .forEach(r => s.removeRepresentationsFromViewport(vid, { segmentationId: r.segmentationId }));
    return reps.map(r => ({ segmentationId: r.segmentationId === id ? 'rtstruct' : r.segmentationId,
                            type: r.type }));
  }, rtNav.viewportId, rtId);
  await page.evaluate(() => window.cornerstone.getEnabledElements().forEach(e => e.viewport.render()));
  await settle(page, 2000);
  out.rt_view = await viewGeometry(page, rtNav.viewportId, args.points);
  await page.screenshot({ path: `${args.outDir}/ohif-rtstruct.png` });
  // the same view with the contours hidden: what differs is what the RTSTRUCT drew
  await page.evaluate((vid, id) => {
    window.services.segmentationService.toggleSegmentationRepresentationVisibility(
      vid, { segmentationId: id, type: 'Contour' });
    window.cornerstone.getEnabledElements().forEach(e => e.viewport.render());
  }, rtNav.viewportId, rtId);
  await settle(page, 1500);
  out.rt_view_hidden = await viewGeometry(page, rtNav.viewportId, args.points);
  await page.screenshot({ path: `${args.outDir}/ohif-rtstruct-hidden.png` });
  // the segmentation panel (contours), opened now that the screenshots are taken (it
  // narrows the viewport): the ROI's name as a row of its own
  out.rt_panel_tabs = await page.$$eval('[data-cy$="-btn"]', els =>
    els.map(e => e.getAttribute('data-cy')));
  const tab = out.rt_panel_tabs.find(t => /panelSegmentation.*Contour/i.test(t))
    || out.rt_panel_tabs.find(t => /panelSegmentation/i.test(t));
  if (tab) await page.click(`[data-cy="${tab}"]`);
  const listed = () => [...document.querySelectorAll('body *')].filter(e => [...e.childNodes]
    .some(n => n.nodeType === 3 && n.textContent.trim() === 'spleen')).length;
  await waitFor(page, 'the ROI listed', listed, null, 20000)
    .catch(e => { out.rt_list_wait = String(e); });
  out.rt_listed = await page.evaluate(listed);
  out.rt_text = await page.evaluate(() => document.body.innerText);
  await page.evaluate((vid, id) => {
    window.services.segmentationService.toggleSegmentationRepresentationVisibility(
      vid, { segmentationId: id, type: 'Contour' });
    window.cornerstone.getEnabledElements().forEach(e => e.viewport.render());
  }, rtNav.viewportId, rtId);
  await settle(page, 1500);
  await page.screenshot({ path: `${args.outDir}/ohif-rtstruct-listed.png` });
  mark('rtstruct_shown');
  }
} catch (e) {
  out.failure = String(e && e.stack || e);
} finally {
  out.errors = errors;
  console.log(JSON.stringify(out));
  await browser.close();
}
