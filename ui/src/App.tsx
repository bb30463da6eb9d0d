import { Link, Route, Routes } from "react-router-dom";

import { Compare } from "./pages/Compare";
import { Lineage } from "./pages/Lineage";
import { Run } from "./pages/Run";
import { Runs } from "./pages/Runs";
import { Task } from "./pages/Task";
import { useTheme } from "./theme";

function NotFound() {
  return (
    <main>
      <h1>Not found</h1>
      <p>
        Nothing lives at this address. <Link to="/">See all runs</Link>.
      </p>
    </main>
  );
}

export function App() {
  const [theme, toggle] = useTheme();
  return (
    <>
      <header className="top">
        <Link to="/" className="brand">
          Metaflow Stack
        </Link>
        <nav>
          <Link to="/">Runs</Link>
        </nav>
        <button className="theme-toggle" onClick={toggle} aria-label="toggle dark mode" data-theme-toggle>
          {theme === "dark" ? "☀ light" : "☾ dark"}
        </button>
      </header>
      <Routes>
        <Route path="/" element={<Runs />} />
        <Route path="/compare" element={<Compare />} />
        <Route path="/lineage/:flow/:run/:step/:task/:name" element={<Lineage />} />
        <Route path="/:flow/:run" element={<Run />} />
        <Route path="/:flow/:run/:step/:task" element={<Task />} />
        <Route path="*" element={<NotFound />} />
      </Routes>
    </>
  );
}
