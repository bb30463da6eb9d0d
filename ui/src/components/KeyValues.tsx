// A table of names and values (a run's parameters, a task's verification), each value as code.
export function KeyValues({ rows, mark }: { rows: [string, string][]; mark?: string }) {
  return (
    <table className="kv">
      <tbody>
        {rows.map(([name, value]) => (
          <tr key={name} {...(mark ? { [`data-${mark}`]: name } : {})}>
            <th>{name}</th>
            <td>
              <code>{value}</code>
            </td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}
