// Injected into a copy of the report by test_demo.py: what headless Chromium can see of the
// layout (boxes past the right margin outside a scrolling box, text blocks that overlap).
(() => {
  const W = document.documentElement.clientWidth;
  const overflow = [];
  for (const el of document.querySelectorAll("body *")) {
    const r = el.getBoundingClientRect();
    if (r.width && r.right > W + 1 && !el.closest(".scroll")) overflow.push(el.tagName + "." + el.className);
  }
  const blocks = [...document.querySelectorAll("h1,h2,h3,p,figure,figcaption,table,dl,ol,pre,dt,dd")];
  const overlaps = [];
  for (let i = 0; i < blocks.length; i++) {
    const a = blocks[i].getBoundingClientRect();
    for (let j = i + 1; j < blocks.length; j++) {
      if (blocks[i].contains(blocks[j]) || blocks[j].contains(blocks[i])) continue;
      const b = blocks[j].getBoundingClientRect();
      const w = Math.min(a.right, b.right) - Math.max(a.left, b.left);
      const h = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
      if (w > 2 && h > 2) overlaps.push(blocks[i].tagName + "/" + blocks[j].tagName + ": " + (blocks[i].textContent || "").slice(0, 40));
    }
  }
  const out = document.createElement("pre");
  out.id = "llm2bids-layout";
  out.textContent = JSON.stringify({
    width: W, height: document.documentElement.scrollHeight,
    pageOverflow: document.documentElement.scrollWidth > W, overflow: overflow.slice(0, 20), overlaps: overlaps.slice(0, 20),
  });
  document.body.appendChild(out);
})();
