// geovote's page: upload one photo (or several of one place, together=true) to /locate and draw the
// answer on a Leaflet map: OpenStreetMap's tiles when they load, the bundled Blue Marble when they do not.
"use strict";
const $ = (id) => document.getElementById(id);

function haversineKm(lat1, lon1, lat2, lon2) {
  const r = Math.PI / 180, R = 6371;
  const a = Math.sin((lat2 - lat1) * r / 2) ** 2 +
            Math.cos(lat1 * r) * Math.cos(lat2 * r) * Math.sin((lon2 - lon1) * r / 2) ** 2;
  return 2 * R * Math.asin(Math.sqrt(Math.min(1, a)));
}

const MERCATOR_MAX_LAT = 85.0511287798;  // retrieve.app.world_jpeg: the Blue Marble in Web Mercator
const map = L.map("map", { worldCopyJump: true }).setView([20, 0], 2);
const blueMarble = L.imageOverlay("/world.jpg", [[-MERCATOR_MAX_LAT, -180], [MERCATOR_MAX_LAT, 180]],
                                  { attribution: "NASA Blue Marble (offline)" });
const blueMarbleLayer = L.layerGroup([blueMarble]);
const osm = L.tileLayer("https://tile.openstreetmap.org/{z}/{x}/{y}.png", {
  maxZoom: 19, attribution: "&copy; <a href=\"https://www.openstreetmap.org/copyright\">OpenStreetMap</a> contributors",
});
L.control.layers({ "OpenStreetMap": osm, "Blue Marble (offline)": blueMarbleLayer }).addTo(map);
L.control.scale().addTo(map);
// online: OpenStreetMap; the first tile that fails to load (offline, blocked) switches to the Blue Marble
let base = navigator.onLine ? osm : blueMarbleLayer;
base.addTo(map);
osm.on("tileerror", () => {
  if (map.hasLayer(osm)) { map.removeLayer(osm); blueMarbleLayer.addTo(map); base = blueMarbleLayer; }
});
const drawn = L.layerGroup().addTo(map);
let lastAnswer = null;
// for tests and the curious: what is on the map
window.geovote = { map, drawn, base: () => (map.hasLayer(osm) ? "osm" : "blue-marble") };

function dot(cls, lat, lon, radius, color, title) {
  return L.circleMarker([lat, lon], { radius, color: "#fff", weight: 2, fillColor: color, fillOpacity: 0.9,
                                      className: `marker ${cls}` }).bindTooltip(title).addTo(drawn);
}

function draw(a) {
  drawn.clearLayers();
  let circle = null;
  if (a.radius_km != null) {  // the 90% radius at its true size on the ground
    circle = L.circle([a.latitude, a.longitude], { radius: 1000 * a.radius_km, color: "#fc0", weight: 2,
                                                    fillOpacity: 0.12, className: "marker radius" })
      .bindTooltip(`the true place is within ${Math.round(a.radius_km).toLocaleString()} km with 90% probability`)
      .addTo(drawn);
  }
  for (const n of a.neighbours || []) dot("neighbour", n.latitude, n.longitude, 3, "#7df", `${n.id} (${n.similarity})`);
  for (const p of a.photos || []) dot("photo", p.latitude, p.longitude, 5, "#3c6", `${p.image}: alone (${(100 * p.confidence).toFixed(0)}%)`);
  a.candidates.slice(1).forEach((c) => dot("alternative", c.latitude, c.longitude, 6, "#fa0", `score ${c.score}`));
  dot("answer", a.latitude, a.longitude, 8, "#f33", "answer").bringToFront();
  window.geovote.circle = circle;
  if (circle && a.radius_km < 5000) map.fitBounds(circle.getBounds(), { maxZoom: 12 });
  else map.setView([a.latitude, a.longitude], 3);
}

function show(a) {
  lastAnswer = a;
  $("download").disabled = false;
  draw(a);
  const place = [a.city, a.region, a.country].filter(Boolean).join(", ");
  const osmLink = `https://www.openstreetmap.org/?mlat=${a.latitude}&mlon=${a.longitude}#map=10/${a.latitude}/${a.longitude}`;
  const rows = a.candidates.slice(1).map((c, i) =>
    `<tr><td>${i + 2}</td><td>${c.latitude.toFixed(4)}, ${c.longitude.toFixed(4)}</td>` +
    `<td>${(100 * c.score).toFixed(0)}%</td>` +
    `<td>${Math.round(haversineKm(a.latitude, a.longitude, c.latitude, c.longitude)).toLocaleString()} km</td></tr>`).join("");
  const together = a.photos ? `<div id="together">${a.photos.length} photos together` +
    ` (the most confident alone: ${(100 * a.best_single_within_200km).toFixed(0)}% within 200 km)</div>` : "";
  $("result").innerHTML =
    `<div class="place" id="place">${place}</div>` + together +
    `<div id="coords">${a.latitude.toFixed(5)}, ${a.longitude.toFixed(5)}</div>` +
    (a.calibrated
      ? `<div><b id="confidence">${(100 * a.confidence).toFixed(0)}%</b> probability within 200 km · ` +
        `90% within <b id="radius-km">${Math.round(a.radius_km).toLocaleString()} km</b> · ` +
        `<a href="${osmLink}" target="_blank" rel="noopener">OpenStreetMap</a></div>` +
        (a.far_pick
          ? `<div id="far-pick">looks far from every training image: ` +
            `answered by the neighbour that fits best once the gallery's density is discounted</div>`
          : "")
      : `<div>${a.photos ? "support" : "vote share"} <b id="confidence">${(100 * a.confidence).toFixed(0)}%</b> ` +
        `(not calibrated) · <a href="${osmLink}" target="_blank" rel="noopener">OpenStreetMap</a></div>`) +
    (rows ? `<table><tr><th>#</th><th>alternative</th><th>${a.calibrated ? "within 200 km" : "score"}</th><th>from the answer</th></tr>${rows}</table>` : "");
  showPhotos(a.photos || []);
  showEvidence((a.neighbours || []).slice(0, 8));
}

// together: each photo's own answer, and how much it agrees with the joint one
function showPhotos(photos) {
  const box = $("photos");
  box.replaceChildren();
  if (!photos.length) return;
  const table = document.createElement("table");
  table.innerHTML = "<tr><th>photo</th><th>alone</th><th>within 200 km</th><th>agrees</th></tr>";
  for (const p of photos) {
    const tr = document.createElement("tr");
    tr.className = "photo-row";
    for (const text of [p.image, `${p.latitude.toFixed(3)}, ${p.longitude.toFixed(3)}`,
                        `${(100 * p.confidence).toFixed(0)}%`, `${(100 * p.agreement).toFixed(0)}%`]) {
      const td = document.createElement("td");
      td.textContent = text;  // file names are the user's: text, never HTML
      tr.appendChild(td);
    }
    table.appendChild(tr);
  }
  box.appendChild(table);
}

// why the engine thinks so: its nearest gallery images, served by the server from that gallery only
function showEvidence(neighbours) {
  const box = $("evidence");
  box.replaceChildren();
  for (const n of neighbours) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = `/gallery/${encodeURIComponent(n.id)}`;
    img.alt = `gallery image ${n.id}`;
    img.title = `${n.id}: similarity ${n.similarity}, ${n.latitude.toFixed(3)}, ${n.longitude.toFixed(3)}`;
    const cap = document.createElement("figcaption");
    cap.textContent = `${n.latitude.toFixed(2)}, ${n.longitude.toFixed(2)}`;
    fig.append(img, cap);
    box.appendChild(fig);
  }
}

// the answer as `retrieve.query --format geojson` writes it: one Point feature, its keys as properties
function answerGeoJSON(a) {
  const props = {};
  for (const [k, v] of Object.entries(a)) if (!["latitude", "longitude", "neighbours"].includes(k)) props[k] = v;
  return { type: "FeatureCollection",
           features: [{ type: "Feature", geometry: { type: "Point", coordinates: [a.longitude, a.latitude] },
                        properties: props }] };
}

$("download").addEventListener("click", () => {
  if (!lastAnswer) return;
  const blob = new Blob([JSON.stringify(answerGeoJSON(lastAnswer))], { type: "application/geo+json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "geovote-answer.geojson";
  document.body.appendChild(link);
  link.click();
  link.remove();
});

// a large photo is shrunk here before it is sent: the model needs a few hundred pixels, and the server
// takes a request of a bounded size, all its photos together
const SEND_MAX_BYTES = 1_500_000, SEND_MAX_SIDE = 1600;
async function shrink(file) {
  if (file.size <= SEND_MAX_BYTES) return file;
  try {
    const bitmap = await createImageBitmap(file);
    const scale = Math.min(1, SEND_MAX_SIDE / Math.max(bitmap.width, bitmap.height));
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(bitmap.width * scale);
    canvas.height = Math.round(bitmap.height * scale);
    canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    const blob = await new Promise((ok) => canvas.toBlob(ok, "image/jpeg", 0.9));
    return blob ? new File([blob], file.name, { type: "image/jpeg" }) : file;
  } catch (e) {
    return file;  // not an image the browser decodes: the server says why
  }
}

async function locate(files) {
  $("error").textContent = "";
  $("result").textContent = files.length > 1 ? `locating ${files.length} photos together...` : "locating...";
  const previews = $("previews");
  previews.replaceChildren();
  previews.classList.toggle("many", files.length > 1);
  for (const f of files) {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(f);
    img.alt = f.name;
    previews.appendChild(img);
  }
  const form = new FormData();
  for (const f of await Promise.all(files.map(shrink))) form.append("image", f);
  if (files.length > 1) form.append("together", "true");
  try {
    const r = await fetch("/locate", { method: "POST", body: form });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    show(body);
  } catch (e) {
    $("result").textContent = "";
    $("error").textContent = e.message;
  }
}

const drop = $("drop");
drop.addEventListener("click", () => $("file").click());
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
$("file").addEventListener("change", (e) => { if (e.target.files.length) locate([...e.target.files]); });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) locate([...e.dataTransfer.files]);
});
fetch("/health").then((r) => r.json()).then((h) => {
  $("health").textContent = `${h.images.toLocaleString()} training images · ${h.backbone}`;
});
